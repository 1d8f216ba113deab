"""The fake-tensor trace: exact byte counts on models small enough to count by hand, and real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import memguard
from memguard import Category
from memguard.estimation.trace import Phase

MiB4 = 4 * 2**20  # one 1024x1024 fp32 matrix


def _linear_estimate(optimizer: str, device: str, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024, bias=False)
    return memguard.estimate(model, example_input=torch.randn(64, 1024), loss_fn=lambda out, batch: out.sum(),
                             optimizer=optimizer, device=device, method="trace", **kwargs)


def _cpu(nbytes: int) -> int:
    """What one CPU buffer costs in RSS: 64-byte aligned, whole pages (with malloc's header) from 64 KiB."""
    if nbytes < 65536:
        return -(-nbytes // 64) * 64
    return -(-(nbytes + 64) // 4096) * 4096


def test_sgd_on_cpu_counts_weight_grad_input_and_scalars() -> None:
    est = _linear_estimate("sgd", "cpu")
    weight, x, scalar = _cpu(MiB4), _cpu(64 * 1024 * 4), _cpu(4)
    # Peak during backward: weight, its gradient, the saved input and the loss; SGD updates in place.
    assert est.breakdown[Category.PARAMETERS] == weight
    assert est.breakdown[Category.GRADIENTS] == weight
    assert est.breakdown[Category.ACTIVATIONS] == x + scalar
    assert est.breakdown[Category.TEMPORARY] == scalar  # the loss's gradient, a ones scalar
    assert est.breakdown[Category.OPTIMIZER_STATE] == 0
    assert est.peak_bytes == 2 * weight + x + 2 * scalar == 8_663_168
    assert est.total_bytes == est.peak_bytes  # no overhead on the CPU


def test_adamw_on_cpu_peaks_in_the_step_with_two_temporaries() -> None:
    est = _linear_estimate("adamw", "cpu")
    weight = _cpu(MiB4)
    assert est.breakdown[Category.OPTIMIZER_STATE] == 2 * weight + _cpu(4)  # exp_avg, exp_avg_sq, step
    # Single-tensor AdamW: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt) holds two full temporaries.
    assert est.breakdown[Category.TEMPORARY] == 2 * weight
    assert est.peak_bytes == 25_456_704


def test_adamw_on_cuda_uses_foreach_and_512_byte_blocks() -> None:
    est = _linear_estimate("adamw", "cuda")
    assert est.breakdown[Category.PARAMETERS] == MiB4
    assert est.breakdown[Category.OPTIMIZER_STATE] == 2 * MiB4 + 512
    assert est.breakdown[Category.TEMPORARY] == MiB4  # foreach sqrt, then divided in place
    assert est.peak_bytes == 21_234_176
    assert est.breakdown[Category.OVERHEAD] > 500 * 2**20  # CUDA context and workspaces
    assert est.total_bytes == est.peak_bytes + est.breakdown[Category.OVERHEAD]


def test_frozen_parameters_get_no_gradient_or_state() -> None:
    model = nn.Linear(1024, 1024)
    model.weight.requires_grad_(False)
    est = memguard.estimate(model, example_input=torch.randn(64, 1024), loss_fn=lambda out, batch: out.sum(),
                            optimizer="adamw", device="cuda", method="trace")
    assert est.breakdown[Category.GRADIENTS] < 8192  # the bias's gradient at most
    assert est.breakdown[Category.OPTIMIZER_STATE] == 2 * 4096 + 512  # bias moments and step only


@pytest.mark.slow
def test_the_users_module_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = memguard.estimate(model, batch_size=2, seq_len=32, device="cpu", method="trace")
    assert est.peak_bytes > 0
    assert not model.training
    for name, param in model.named_parameters():
        assert type(param) is nn.Parameter and param.device.type == "cpu"
        assert param.grad is None
        assert torch.equal(param, before[name]), name


@pytest.mark.slow
def test_meta_module_traces_like_the_real_one() -> None:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64)
    real = GPT2LMHeadModel(config)
    with torch.device("meta"):
        meta = GPT2LMHeadModel(config)
    a = memguard.estimate(real, 2, 32, device="cpu", method="trace")
    b = memguard.estimate(meta, 2, 32, device="cpu", method="trace")
    assert a.breakdown == b.breakdown


@pytest.mark.slow
def test_gpt2_preset_parameters_and_adam_state_are_exact() -> None:
    est = memguard.estimate("gpt2", batch_size=1, seq_len=64, device="cuda", method="trace")
    n = 124_439_808  # GPT-2 small; lm_head is tied to wte and counted once
    # Every GPT-2 parameter tensor is a multiple of 512 bytes except a few biases: rounding adds < 0.01%.
    assert n * 4 <= est.breakdown[Category.PARAMETERS] < n * 4 * 1.0001
    assert 2 * n * 4 <= est.breakdown[Category.OPTIMIZER_STATE] < 2 * n * 4 * 1.001


@pytest.mark.slow
def test_bf16_true_halves_parameter_bytes() -> None:
    full = memguard.estimate("gpt2", 1, 64, device="cuda", method="trace", precision="32-true")
    half = memguard.estimate("gpt2", 1, 64, device="cuda", method="trace", precision="bf16-true")
    ratio = half.breakdown[Category.PARAMETERS] / full.breakdown[Category.PARAMETERS]
    assert 0.4999 < ratio <= 0.5001


@pytest.mark.slow
def test_cuda_mode_takes_fused_attention_where_the_cpu_falls_back_to_math() -> None:
    # GPT-2 trains with attention dropout: on the CPU, SDPA then takes the math path and keeps
    # B*H*S*S scores; on a GPU, flash attention keeps none of them.
    b, s, h, layers = 2, 512, 12, 12
    scores = b * h * s * s * 4
    cpu = memguard.estimate("gpt2", b, s, device="cpu", method="trace", optimizer="sgd")
    cuda = memguard.estimate("gpt2", b, s, device="cuda", method="trace", optimizer="sgd")
    assert cpu.peak_bytes - cuda.peak_bytes > layers * scores


@pytest.mark.slow
def test_gradient_checkpointing_keeps_fewer_activations() -> None:
    plain = memguard.estimate("gpt2", 4, 256, device="cuda", method="trace", optimizer="sgd")
    ckpt = memguard.estimate("gpt2", 4, 256, device="cuda", method="trace", optimizer="sgd",
                             gradient_checkpointing=True)
    assert ckpt.peak_bytes < plain.peak_bytes
    assert ckpt.inputs["gradient_checkpointing"] is True


@pytest.mark.slow
def test_lightning_loop_keeps_last_steps_gradients_through_the_forward() -> None:
    pytorch = memguard.estimate("gpt2", 2, 128, device="cuda", method="trace", optimizer="sgd")
    lightning = memguard.estimate("gpt2", 2, 128, device="cuda", method="trace", optimizer="sgd",
                                  training_loop="lightning")
    assert lightning.peak_bytes > pytorch.peak_bytes
    assert lightning.breakdown[Category.GRADIENTS] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bert-base-uncased", "t5-small", "vit-base"])
def test_other_architectures_trace(preset: str) -> None:
    est = memguard.estimate(preset, 2, 64, device="cuda", method="trace")
    assert est.method == "trace"
    assert est.breakdown[Category.ACTIVATIONS] + est.breakdown[Category.TEMPORARY] > 0
    assert est.notes == ()


@pytest.mark.slow
def test_plain_pytorch_transformer_with_data_dependent_op() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.encoder(x)
            if h.abs().max().item() > 1e6:  # data-dependent: runs on a stand-in value
                h = h / 2
            return self.head(h.mean(1))

    est = memguard.estimate(Classifier(), example_input=torch.randn(4, 16, 64), batch_size=8,
                            loss_fn=lambda out, batch: out.logsumexp(-1).mean(), device="cpu")
    assert est.method == "trace"
    assert est.inputs["batch_size"] == 8
    assert any("_local_scalar_dense" in n for n in est.notes)


def test_step_fn_traces_a_custom_training_step() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    batch = (torch.randn(32, 64), torch.randint(0, 10, (32,)))

    def step(b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    small = memguard.estimate(model, example_input=batch, step_fn=step, device="cuda", method="trace")
    large = memguard.estimate(model, example_input=batch, step_fn=step, device="cuda", method="trace",
                              batch_size=1024)
    assert small.inputs["batch_size"] == 32
    # The ReLU output and both saved layer inputs grow with the batch: (64 + 256 + 256) floats a sample.
    grown = large.breakdown[Category.ACTIVATIONS] - small.breakdown[Category.ACTIVATIONS]
    assert grown >= (1024 - 32) * (64 + 256) * 4


def test_output_without_loss_needs_loss_fn() -> None:
    with pytest.raises(memguard.ConfigError, match="loss_fn"):
        memguard.estimate(nn.Linear(8, 8), example_input=torch.randn(4, 8), device="cpu", method="trace")


# -- where the peak is -------------------------------------------------------------------------------


def test_the_tensors_alive_at_the_peak_add_up_to_it_and_name_their_module() -> None:
    est = _linear_estimate("adamw", "cpu")
    weight, x = _cpu(MiB4), _cpu(64 * 1024 * 4)
    assert sum(g.nbytes for g in est.at_peak) == est.peak_bytes
    groups = {(g.where, g.category): g for g in est.at_peak}
    assert groups["Linear", Category.PARAMETERS].nbytes == weight  # the root module's own weight
    assert groups["Linear", Category.PARAMETERS].shape == (1024, 1024)
    assert groups["Linear", Category.PARAMETERS].dtype == "torch.float32"
    state = groups["Linear", Category.OPTIMIZER_STATE]
    assert (state.count, state.nbytes) == (3, 2 * weight + _cpu(4))  # two moments and the step counter
    assert est.at_peak[0].nbytes == max(g.nbytes for g in est.at_peak)  # largest first
    # The saved input of the forward is the batch: tracked as the forward's, no module made it.
    assert sum(g.nbytes for g in est.at_peak if g.category == Category.ACTIVATIONS) >= x


@pytest.mark.slow
def test_the_timeline_peaks_at_the_peak_and_walks_the_phases() -> None:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    est = memguard.estimate(model, 4, 128, method="trace", precision="bf16-mixed")
    assert max(live for _, _, live in est.timeline) == est.peak_bytes
    phases = [phase for _, phase, _ in est.timeline]
    first = {p: phases.index(p) for p in ("forward", "backward", "optimizer")}
    assert first["forward"] < first["backward"] < max(i for i, p in enumerate(phases) if p == "optimizer")
    assert {type(phase) for phase in phases} == {str}  # the plain string, not the Phase enum
    assert set(phases) <= {p.value for p in Phase}
    events = [e for e, _, _ in est.timeline]
    assert events == sorted(events)
    made_by = {g.where for g in est.at_peak if g.category == Category.ACTIVATIONS}
    assert any(w.startswith("transformer.h.1.") for w in made_by), made_by
    assert "top" not in str(est) and "alive at the peak" in str(est)
    data = est.to_dict()
    assert max(p[2] for p in data["timeline"]) == data["peak_bytes"]
    assert data["at_peak"][0]["bytes"] == est.at_peak[0].nbytes
    assert memguard.MemoryEstimate.from_dict(data) == est


def test_only_the_trace_knows_where_the_peak_is() -> None:
    est = memguard.estimate("gpt2", 1, 64, method="formula")
    assert est.at_peak == () and est.timeline == ()


@pytest.mark.slow
def test_full_sharding_marks_the_blocks_backward() -> None:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    est = memguard.estimate(model, 2, 64, method="trace", strategy="fsdp", world_size=2)
    order = [p for i, (_, p, _) in enumerate(est.timeline) if i == 0 or est.timeline[i - 1][1] != p]
    assert order[order.index("backward") + 1] == Phase.BLOCK_BACKWARD.value  # the head's, then the blocks'
    single = memguard.estimate(model, 2, 64, method="trace")
    assert "block-backward" not in {p for _, p, _ in single.timeline}  # marked only where it matters


# -- the pipeline: record -> classify -> analyse -----------------------------------------------------


def test_the_stages_record_classify_and_analyse_a_step_as_trace_breakdown_does() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memguard.estimation.spec import TrainingSpec
    from memguard.estimation.trace import trace_breakdown
    from memguard.estimation.trace.analyse import analyse
    from memguard.estimation.trace.classify import classify
    from memguard.estimation.trace.ledger import CountingMode, Ledger
    from memguard.estimation.trace.record import Loop, recorded

    model = nn.Linear(1024, 1024, bias=False)
    before = model.weight.detach().clone()
    spec = TrainingSpec.create(batch_size=64, optimizer="sgd-momentum", device="cpu")
    loop = Loop(lambda: ((torch.empty(64, 1024),), {}), loss_fn=lambda out, batch: out.sum())
    counting = CountingMode(Ledger("cpu"), FakeTensorMode(allow_non_fake_inputs=True))
    with recorded(model, spec, loop, counting) as recording:
        kinds = classify(recording)
        cats = {(r.shape, kinds[i]) for i, r in enumerate(recording.ledger.records) if r.free is None}
        report = analyse(recording.ledger.records, recording.ledger.marks, kinds)
    weight, x = (1024, 1024), (64, 1024)
    # Alive at the end: the weight, its momentum buffer and the last batch (gradients set to None).
    assert cats == {(weight, Category.PARAMETERS), (weight, Category.OPTIMIZER_STATE), (x, Category.ACTIVATIONS)}
    assert [str(p) for _, p in recording.ledger.marks][:4] == ["other", "optimizer", "other", "forward"]
    assert report.breakdown[Category.PARAMETERS] == report.breakdown[Category.GRADIENTS] == _cpu(MiB4)
    assert report.breakdown[Category.OPTIMIZER_STATE] == _cpu(MiB4)
    assert torch.equal(model.weight, before) and model.weight.grad is None  # the user's module, untouched
    whole = trace_breakdown(model, spec, loop.make_inputs, loss_fn=loop.loss_fn)
    assert (whole.breakdown, whole.at_peak, whole.timeline) == (report.breakdown, report.at_peak, report.timeline)


def test_the_trace_imports_no_private_name() -> None:
    """Pins a house rule of the trace, ``estimate()`` and the architecture reader: no private memguard
    name imported, not even within the trace. (Short functions without apologies: for the whole
    package, ``tests/test_house_rules.py``.)"""
    import ast
    from pathlib import Path

    package = Path(memguard.__file__).parent / "estimation"
    files = [*sorted((package / "trace").glob("*.py")), package / "estimator.py", package / "arch.py"]
    assert len(files) == 12
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memguard"):
                private = [p for p in (*node.module.split("."), *(a.name for a in node.names)) if p.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports {private}"
