"""A plan of a preset by the formula reads its shipped description (:mod:`memguard.estimation.description`): LoRA
and QLoRA derived from it, no module built, no torch needed (issue 19); the plan and the remedies are the ones the
built modules give, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import memguard
from memguard.estimation.description import preset_description
from memguard.planning import plan, remedies
from memguard.planning.api import make_setup


@pytest.fixture
def none_shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No description shipped: a plan builds each module (and LoRA, QLoRA) as before."""
    monkeypatch.setattr("memguard.estimation.description.DESCRIPTION_DIR", tmp_path)
    preset_description.cache_clear()
    yield
    preset_description.cache_clear()


PLANS = [
    pytest.param("llama-2-7b", {"seq_len": 2048, "gpu": "A100-80GB", "batch_size": 4,
                                "base": {"precision": "bf16-mixed"}, "lora_ranks": (16, 64)}, id="llama-2-7b"),
    pytest.param("mistral-7b", {"seq_len": 512, "gpu": "24GiB", "batch_size": 4, "gpus": 4,
                                "base": {"precision": "bf16-mixed", "lora_rank": 8, "quantization": "nf4"}},
                 id="mistral-7b"),
    # traces its near misses (20-30 s): the full suite's
    pytest.param("gpt2", {"seq_len": 256, "gpu": "2GiB", "batch_size": 8, "gpus": 2,
                          "base": {"strategy": "fsdp", "world_size": 2, "gradient_checkpointing": True}},
                 marks=pytest.mark.slow, id="gpt2"),
    # an encoder-decoder's search by the formula alone: its near misses are not traced (NEAR_TRACES = 0),
    # as the traces of whole T5s (30 s) would test the trace, the same on both sides, not the description
    pytest.param("t5-small", {"seq_len": 128, "gpu": "1GiB", "batch_size": 16, "base": {"optimizer": "adafactor"},
                              "near_traces": 0}, id="t5-small"),
]


def _plan(name: str, kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k != "near_traces"}
    data = plan(name, confirm=0, limit=4, **kwargs).to_dict()
    del data["seconds"]
    return data


@pytest.mark.parametrize(("name", "kwargs"), PLANS)
def test_a_formula_plan_of_a_preset_is_the_same_from_its_description(name: str, kwargs: dict, request,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    setup = make_setup(name, None, gpu=kwargs["gpu"], seq_len=None, gpus=None, batch_size=None, margin=0.1,
                       precision=None, optimizers=None, base=None, lora_ranks=(8,), method_prune="formula", confirm=0,
                       limit=1, device="cuda", max_estimates=10, estimate_kwargs=None)
    assert setup.description is not None and setup.modules == {}  # nothing built
    if "near_traces" in kwargs:
        monkeypatch.setattr("memguard.planning.search.NEAR_TRACES", kwargs["near_traces"])
    described = _plan(name, kwargs)
    request.getfixturevalue("none_shipped")
    assert described == _plan(name, kwargs)
    assert described["rows"]  # gpt2's near misses traced: the modules built on first use, the same traces
    assert (described["traced"] == 0) == ("near_traces" in kwargs or name != "gpt2")


def test_remedies_of_a_formula_estimate_are_the_same_from_the_description(none_shipped: None) -> None:
    kwargs = {"batch_size": 4, "seq_len": 2048, "precision": "bf16-mixed", "method": "formula"}
    est = memguard.estimate("llama-2-7b", **kwargs)
    built = [r.to_dict() for r in remedies(est, "A100-80GB", top=3)]
    preset_description.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("memguard.estimation.description.DESCRIPTION_DIR",
                   Path(memguard.__file__).parent / "estimation" / "presets" / "described")
        described = [r.to_dict() for r in remedies(est, "A100-80GB", top=3)]
    assert described == built and len(built) == 3
    assert {r["group"] for r in built} == {"full fine-tuning", "LoRA", "QLoRA"}


def test_a_model_with_code_of_the_users_or_without_lora_sites_is_built() -> None:
    def setup(model: str, extra: dict | None = None) -> object:
        return make_setup(model, None, gpu="24GiB", seq_len=64, gpus=None, batch_size=None, margin=0.1,
                          precision=None, optimizers=None, base=None, lora_ranks=(8,), method_prune="formula",
                          confirm=0, limit=1, device="cuda", max_estimates=10, estimate_kwargs=extra)

    assert setup("vit-base").description is None  # peft has no default targets: LoRA's error comes from peft
    assert setup("gpt2", {"loss_fn": lambda out, batch: out.loss}).description is None
    assert setup("gpt2").description is not None


@pytest.mark.slow
def test_plan_and_check_of_a_preset_by_the_formula_import_no_torch() -> None:
    """``memguard plan PRESET --confirm 0`` and a ``check --method formula`` that does not fit (its remedies search
    LoRA, QLoRA, DeepSpeed and FSDP) import neither torch nor transformers nor peft."""
    probe = ("import sys, runpy; sys.argv = ['memguard', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('memguard', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), file=sys.stderr)")
    args = ["llama-2-7b", "--batch-size", "4", "--seq-len", "2048", "--precision", "bf16-mixed", "--gpu", "A100-80GB"]
    for command in (["plan", *args, "--confirm", "0"], ["check", *args, "--method", "formula"]):
        proc = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(Path(memguard.__file__).parents[1])})
        assert proc.stderr.strip().splitlines()[-1] == "[]", (command, proc.stderr[-2000:])
        assert "QLoRA" in proc.stdout or "QLoRA" in proc.stderr, command
