"""memguard.Step: the training knobs as one value, checked once, listed in one place."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import pathlib
import pickle
import re

import pytest
import torch
from transformers import LlamaConfig

import memguard
from memguard.errors import ConfigError
from memguard.estimation.estimator import estimate
from memguard.estimation.parallel import Strategy
from memguard.estimation.step import KNOBS, METHODS, Method, Step, TrainingLoop

NOT_KNOBS = {"model", "example_input", "method", "loss_fn", "step_fn", "trace_timeout", "step"}
"""estimate()'s arguments that are not knobs of a step: what to run it on and how to estimate it."""


def _tiny() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)


def test_step_is_exported_from_the_facade() -> None:
    assert memguard.Step is Step and "Step" in memguard.__all__


def test_the_knobs_are_estimates_keyword_arguments_with_the_same_defaults() -> None:
    """One list: Step's fields are estimate()'s knobs, by name and default."""
    params = inspect.signature(estimate).parameters
    assert set(params) - NOT_KNOBS == set(KNOBS)
    defaults = {f.name: f.default for f in dataclasses.fields(Step)}
    assert {k: params[k].default for k in KNOBS} == defaults
    assert params["step"].kind is inspect.Parameter.KEYWORD_ONLY


def test_the_cli_has_a_flag_for_every_knob_with_steps_default() -> None:
    """``memguard check``'s flags are the knobs (the loop aside: a LightningCLI file sets it), with the
    Step's defaults, so the CLI passes them on by Step's list."""
    from memguard.cli import build_parser

    args = build_parser().parse_args(["check", "gpt2"])
    flagged = [k for k in KNOBS if k != "training_loop"]
    defaults = {f.name: f.default for f in dataclasses.fields(Step)}
    assert {k: getattr(args, k) for k in flagged} == {k: defaults[k] for k in flagged}
    assert not hasattr(args, "training_loop")


def test_plan_searches_the_step_knobs_it_does_not_keep_fixed() -> None:
    from memguard.planning.rows import FIXED_KNOBS, SEARCHED_KNOBS, Knobs

    assert set(FIXED_KNOBS) < set(KNOBS) and set(SEARCHED_KNOBS) == set(KNOBS) - set(FIXED_KNOBS)
    knobs = Knobs("bf16-mixed", "adamw", True, "ddp", 2, False, False, 8, 4, 2, "nf4-dq")
    assert tuple(knobs.kwargs()) == SEARCHED_KNOBS
    assert Knobs.from_step(Step(**knobs.kwargs())) == knobs  # the round trip
    assert knobs.strategy is Strategy.DDP  # a name is read as the Strategy


def test_inputs_are_the_steps_knobs_with_the_method_after_the_device() -> None:
    est = estimate(_tiny(), 2, 32, method="formula", device="cpu")
    at = KNOBS.index("training_loop")
    assert tuple(est.inputs) == ("model", *KNOBS[:at], "method", *KNOBS[at:])


@pytest.mark.parametrize("method", ["formula", pytest.param("trace", marks=pytest.mark.slow)])
def test_estimate_with_a_step_equals_the_keyword_form(method: str) -> None:
    kwargs = {"batch_size": 2, "seq_len": 32, "precision": "bf16-mixed", "optimizer": "sgd-momentum",
              "gradient_checkpointing": True, "accumulate_grad_batches": 3, "set_to_none": False, "device": "cpu",
              "lora_rank": 4}
    by_keywords = estimate(_tiny(), method=method, **kwargs)
    by_step = estimate(_tiny(), method=method, step=Step(**kwargs))
    # everything but the trace's timeline, whose points mid-step differ by a few hundred bytes from one trace
    # to the next under checkpointing (the same with keywords alone); its peak and breakdown do not
    assert {**by_step.to_dict(), "timeline": None} == {**by_keywords.to_dict(), "timeline": None}
    assert by_step.total_bytes == by_keywords.total_bytes > 0


def test_keywords_not_left_at_their_defaults_replace_the_steps() -> None:
    step = Step(batch_size=2, seq_len=32, device="cpu", strategy="fsdp", world_size=4)
    est = estimate(_tiny(), 8, method="formula", step=step, precision="bf16-true")
    assert (est.inputs["batch_size"], est.inputs["precision"], est.inputs["strategy"], est.inputs["world_size"]) == (
        8, "bf16-true", "fsdp", 4)
    same = estimate(_tiny(), method="formula", step=step.replace(batch_size=8, precision="bf16-true"))
    assert est.to_dict() == same.to_dict()
    with pytest.raises(ConfigError, match=r"^step must be a memguard.Step, got dict \{'batch_size': 2\}$"):
        estimate(_tiny(), method="formula", step={"batch_size": 2})  # type: ignore[arg-type]


def test_a_step_normalises_every_form_to_one_value() -> None:
    a = Step(precision="bf16", optimizer="AdamW_8bit", device=torch.device("cuda", 1),
             strategy="deepspeed_stage_3_offload", world_size=4.0, skip_modules=["lm_head"], quantization=" NF4 ")
    assert (a.precision, a.optimizer, a.device, a.strategy, a.world_size) == (
        "bf16-mixed", "adamw-8bit", "cuda", Strategy.DEEPSPEED_STAGE_3, 4)
    assert (a.offload_optimizer, a.offload_params, a.quantization, a.skip_modules) == (True, True, "nf4", ("lm_head",))
    assert a.training_loop is TrainingLoop.PYTORCH and a.training_loop == "pytorch"
    b = Step(precision="bf16-mixed", optimizer="adamw-8bit", strategy="deepspeed_stage_3", world_size=4,
             offload_optimizer=True, offload_params=True, quantization="nf4", skip_modules=("lm_head",))
    assert a == b and hash(a) == hash(b)
    assert repr(a) == ("Step(precision='bf16-mixed', optimizer='adamw-8bit', strategy='deepspeed_stage_3', "
                       "world_size=4, offload_optimizer=True, offload_params=True, quantization='nf4', "
                       "skip_modules=['lm_head'])")
    assert a.to_dict()["strategy"] == "deepspeed_stage_3" and type(a.to_dict()["strategy"]) is str
    assert a.layout.shard_size == 4 and a.quant is not None and a.quant.label == "nf4"
    assert a.spec.precision.autocast_dtype == torch.bfloat16
    assert repr(Step()) == "Step()"



def test_a_step_builds_its_spec_and_layout_once() -> None:
    """The spec and layout built to check the knobs are the ones read: built once, on construction,
    equal to building them again from the knobs; they are no fields, so equality, hashing and
    pickling see the knobs alone (the spec of an optimizer class holds a closure that does not pickle)."""
    from memguard.estimation.parallel import resolve_parallelism
    from memguard.estimation.spec import TrainingSpec

    step = Step(batch_size=8, seq_len=64, precision="bf16", optimizer="AdamW_8bit",
                strategy="deepspeed_stage_3_offload", world_size=4, moe_routing="worst")
    assert step.spec is step.spec and step.layout is step.layout
    assert step.spec == TrainingSpec.create(batch_size=8, seq_len=64, optimizer="adamw-8bit", precision="bf16-mixed",
                                            device="cuda", moe_routing="worst")
    assert step.layout == resolve_parallelism("deepspeed_stage_3", 4, offload_optimizer=True, offload_params=True)
    assert step.replace(batch_size=2).spec.batch_size == 2 and step.spec.batch_size == 8
    assert [f.name for f in dataclasses.fields(Step)] == list(KNOBS)
    sgd = Step(optimizer=torch.optim.SGD, strategy="fsdp", world_size=2)
    for twin in (pickle.loads(pickle.dumps(sgd)), copy.deepcopy(sgd), copy.copy(sgd)):
        assert twin == sgd and hash(twin) == hash(sgd) and twin.optimizer is torch.optim.SGD
        assert twin.spec.optimizer.name == "sgd" and twin.layout == sgd.layout


BAD = [
    ({"training_loop": "keras"}, "unknown training_loop 'keras'; expected one of pytorch, lightning"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be a positive integer, got 0"),
    ({"set_to_none": 1}, "set_to_none must be True or False, got 1"),
    ({"world_size": 0}, "world_size must be a positive integer, got 0"),
    ({"offload_params": "no"}, "offload_params must be True or False, got 'no'"),
    ({"strategy": "ddp", "offload_optimizer": True},
     "offload_optimizer needs a sharded strategy (fsdp or deepspeed_stage_*), not 'ddp'"),
    ({"lora_rank": -1}, "lora_rank must be a positive integer, got -1"),
    ({"quantization": "int3"}, "unknown quantization 'int3'; expected one of nf4, fp4, int8 (bitsandbytes' 4-bit "
                               "NF4/FP4 or LLM.int8) or None"),
    ({"double_quant": 1}, "double_quant must be True or False, got 1"),
    ({"quantization": "int8", "double_quant": True},
     "double_quant=True applies to 4-bit quantization ('nf4' or 'fp4'), not 'int8'"),
    ({"skip_modules": "a"}, "skip_modules needs a quantization ('nf4', 'fp4' or 'int8')"),
    ({"moe_routing": "x"}, "moe_routing must be 'balanced', 'worst' or a capacity factor >= 1 (Switch Transformer "
                           "uses 1.25), got 'x'"),
    ({"batch_size": True}, "batch_size must be a positive integer, got True"),
    ({"decoder_seq_len": 1.5}, "decoder_seq_len must be a positive integer, got 1.5"),
    ({"device": "tpu"}, "unknown device 'tpu'; expected 'cuda' (or 'cuda:N') or 'cpu'"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be None, True or False, got 'yes'"),
    ({"batch_size": 2**31}, "batch_size=2,147,483,648 is past any device: memguard takes at most 2,147,483,647"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=[next(iter(b)) + str(i) for i, (b, _) in enumerate(BAD)])
def test_a_bad_knob_is_refused_once_naming_it_as_estimate_always_did(bad: dict, message: str) -> None:
    """The messages are those estimate() gave before the Step existed, byte for byte; the Step raises
    them on construction and estimate() raises the same before building the model."""
    with pytest.raises(ConfigError) as by_step:
        Step(**bad)
    assert str(by_step.value) == message
    with pytest.raises(ConfigError) as by_estimate:
        estimate("no-such-model-is-built-first", **bad)
    assert str(by_estimate.value) == message
    with pytest.raises(ConfigError) as by_replace:
        Step().replace(**bad)
    assert str(by_replace.value) == message


def test_a_bad_method_is_named() -> None:
    assert METHODS == tuple(m.value for m in Method) == ("auto", "trace", "formula", "seed")
    with pytest.raises(ConfigError, match=r"^unknown method 'guess'; expected one of auto, trace, formula, seed$"):
        estimate("gpt2", method="guess")


def test_the_knobs_are_checked_in_one_module() -> None:
    """``Step.__post_init__`` is the one place a step's knobs are checked: no other module of the library
    resolves a layout or a quantization from user input, or builds a spec from its arguments (the
    trace's warm-up builds one of its own fixed values)."""
    root = pathlib.Path(memguard.__file__).parent
    checks = re.compile(r"\b(resolve_parallelism|resolve_quantization|TrainingSpec\.create)\(")
    found = {str(p.relative_to(root)) for p in root.rglob("*.py")
             for line in p.read_text().splitlines() if checks.search(line) and not line.lstrip().startswith("def ")}
    assert found == {"estimation/step.py", "estimation/trace/warm_up.py"}


def test_strategy_owns_what_the_planner_asked_of_its_names() -> None:
    """The planner's old tables (``_LEVEL``, ``_engine``, ``_DS3``) as Strategy's properties."""
    level = {Strategy.SINGLE: 0, Strategy.DDP: 1, Strategy.DEEPSPEED_STAGE_1: 2, Strategy.DEEPSPEED_STAGE_2: 2,
             Strategy.FSDP_SHARD_GRAD_OP: 2, Strategy.FSDP: 3, Strategy.FSDP_HYBRID: 3, Strategy.DEEPSPEED_STAGE_3: 3}
    assert {s: s.sharding_level for s in Strategy} == level
    assert [s.engine for s in Strategy] == [None, None, "fsdp", "fsdp", "fsdp", "deepspeed", "deepspeed", "deepspeed"]


def test_no_private_planning_name_crosses_a_module() -> None:
    """planning/'s modules import each other's public names only."""
    root = pathlib.Path(memguard.__file__).parent / "planning"
    crossing = [f"{p.name}: {node.module}.{alias.name}" for p in root.glob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("memguard") for alias in node.names if alias.name.startswith("_")]
    assert crossing == []


def test_the_tables_header_leaves_out_knobs_at_steps_defaults() -> None:
    """``MemoryEstimate.table()`` shows knobs (it cannot import Step: no torch there); its defaults are the Step's."""
    from memguard.estimation import result

    defaults = {f.name: f.default for f in dataclasses.fields(Step)}
    assert set(result._SHOWN_INPUTS) <= {"model", *KNOBS}
    assert {k: defaults[k] for k in result._DEFAULT_INPUTS} == result._DEFAULT_INPUTS
