"""diffusers models: traced with their frozen configs untouched, against the tensors a real step holds."""

from __future__ import annotations

import collections
import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memguard
from memguard.estimation.kernels import transient
from memguard.estimation.trace.isolation import Copier
from memguard.estimation.trace.ledger import rounded

diffusers = pytest.importorskip("diffusers")
from diffusers.configuration_utils import FrozenDict  # noqa: E402

pytestmark = pytest.mark.slow


class Refusing(dict):
    """A dict whose mutating methods raise, as diffusers' ``FrozenDict`` does for ``update``."""

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("frozen")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("frozen")

    def clear(self) -> None:
        raise TypeError("frozen")


class Registry(dict):
    """A dict subclass whose constructor takes no items."""

    def __init__(self) -> None:
        super().__init__()


def _refusing(items: dict[str, Any]) -> Refusing:
    out = Refusing()
    dict.update(out, items)
    return out


def test_containers_are_copied_without_their_mutating_methods() -> None:
    copier = Copier(lambda t: torch.empty_like(t), {})  # its memo is by id: keep every original alive
    inner = [1, 2]
    frozen = FrozenDict(a=inner, b=3)
    out = copier.value(frozen)
    assert type(out) is FrozenDict and out == frozen and out is not frozen
    assert out["a"] is not inner and out.a is out["a"]  # its attributes are its items, copied once
    original = _refusing({"x": [1]})
    refusing = copier.value(original)
    assert type(refusing) is Refusing and refusing == {"x": [1]} and refusing["x"] is not original["x"]
    registry = Registry()
    dict.update(registry, {"y": [2]})
    rebuilt = copier.value(registry)
    assert type(rebuilt) is dict and rebuilt == {"y": [2]}  # its constructor takes no items: a plain copy
    loop: list[Any] = [1]
    loop.append(loop)
    copied = copier.value(loop)
    assert copied[1] is copied and copied is not loop
    default = collections.defaultdict(list, a=[1])
    counts = copier.value(default)
    assert type(counts) is collections.defaultdict and counts.default_factory is list and counts == {"a": [1]}
    queue = collections.deque([1, 2], maxlen=5)
    window = copier.value(queue)
    assert window.maxlen == 5 and list(window) == [1, 2]


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.settings = _refusing({"scale": 2.0})
        self.config = FrozenDict(width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.settings["scale"] * self.config.width


def test_a_module_with_frozen_containers_is_traced_and_left_as_it_was() -> None:
    module = _Holder()
    settings, config = module.settings, module.config
    est = memguard.estimate(module, example_input=torch.randn(2, 4), loss_fn=lambda out, b: out.sum(),
                            device="cpu", method="trace")
    assert est.method == "trace" and est.peak_bytes > 0
    assert module.settings is settings and module.config is config and config == {"width": 4}


# --------------------------------------------------------------------------- real diffusers models


def _unet() -> nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _vae() -> nn.Module:
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32)


def _sd3() -> nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16)


MODELS = {
    "unet": (_unet, lambda: {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
                             "encoder_hidden_states": torch.randn(2, 8, 32)}),
    "vae": (_vae, lambda: {"sample": torch.randn(2, 3, 32, 32)}),
    "sd3": (_sd3, lambda: {"hidden_states": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
                           "encoder_hidden_states": torch.randn(2, 8, 32), "pooled_projections": torch.randn(2, 32)}),
}


class _LiveBytes(TorchDispatchMode):
    """The high-water mark of tensor storages a real step holds, rounded as the trace rounds them,
    with what a CPU kernel holds inside an op beside them (:func:`memguard.estimation.kernels.transient`,
    the oneDNN convolutions' copies; measured in ``tests/test_kernels.py``), which no tensor shows."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.seen:
            return
        n = rounded(storage.nbytes(), "cpu")
        self.seen[storage] = n
        self.live += n
        weakref.finalize(storage, self._free, n)
        self.peak = max(self.peak, self.live)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        held = transient(func, args, out, "cpu")
        self.peak = max(self.peak, self.live + (rounded(held, "cpu") if held else 0))
        return out


def _real_peak(module: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Two steps of SGD with momentum on the default denoising loss, counted tensor by tensor."""
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    live = _LiveBytes()
    with live:
        for t in [*module.parameters(), *batch.values()]:
            live.add(t)
        for _ in range(2):
            sample = module(**batch).sample.float()
            loss = nn.functional.mse_loss(sample, torch.zeros((), dtype=sample.dtype).expand_as(sample))
            del sample
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return live.peak


@pytest.mark.parametrize("name", list(MODELS))
def test_diffusers_models_trace_the_tensors_a_real_step_holds(name: str) -> None:
    build, batch = MODELS[name]
    torch.manual_seed(0)
    module = build().train()
    est = memguard.estimate(module, example_input=batch(), optimizer="sgd-momentum", device="cpu", method="trace")
    real = _real_peak(module, batch())
    assert est.method == "trace" and type(module.config) is FrozenDict
    assert abs(est.peak_bytes - real) / real < 0.01, (est.peak_bytes, real)
