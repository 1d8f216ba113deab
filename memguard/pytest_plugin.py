"""pytest plugin: skip or fail a GPU test before it runs when its training step will not fit.

Registered through the ``pytest11`` entry point, so it is active wherever memguard is installed.
A test declares what it trains with a marker; before its fixtures are set up, the plugin estimates
that step and compares it with the GPU's free memory:

.. code-block:: python

    @pytest.mark.memguard("gpt2", batch_size=8, seq_len=1024, precision="bf16-mixed")
    def test_finetune(memguard_estimate):
        ...  # memguard_estimate is the MemoryEstimate of the marker

.. code-block:: text

    pytest                            # against this machine's GPU (cuda:0 / the current device)
    pytest --memguard-gpu A100-40GB   # against a catalog GPU, a size such as 24GiB, or cuda:1 / 1
    pytest --memguard-gpu A100-40GB --memguard-check-only   # only the checks, on a runner without GPU

The marker takes what :func:`memguard.estimate` takes (``model`` first, positionally or by name)
plus ``margin`` (default 0.1) and ``on_oom``: ``"skip"`` (default) or ``"fail"``. With no GPU
visible and no ``--memguard-gpu``, marked tests are skipped: a GPU test cannot run there anyway.
``--memguard-gpu`` is read as a :class:`memguard.device.DeviceSpec`, as the ``memguard`` command reads
``--gpu`` (bare digits are a CUDA index; a size needs its unit; a bare share is of the CUDA device), and the
verdict is :class:`memguard.fit.Fit`'s. A bf16 marker against a card without bf16 (T4, V100) fails, as
``memguard check`` refuses it.

Where memory is read from is :data:`READERS` in the config's stash (default: this machine), which a
test suite of memguard's own sets from a plugin's ``pytest_configure(tryfirst=True)``.

Against a live GPU the free memory is read before each test (through NVML), adding back what this
process's CUDA caching allocator holds but does not use, since the next test can reuse it.

This module imports only pytest at import time; the estimator and the device readers are imported
on the first marked test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from memguard._cache import Cached
    from memguard.device import DeviceMemory
    from memguard.estimation.result import MemoryEstimate
    from memguard.fit import Fit

__all__ = ["READERS", "memguard_estimate"]

_ON_OOM = ("skip", "fail")
_OWN = ("margin", "on_oom")
_MARKER = ("memguard(model, batch_size=None, seq_len=None, *, precision='32-true', optimizer='adamw', "
           "margin=0.1, on_oom='skip', **estimate_kwargs): estimate the training step this test runs "
           "and skip it (on_oom='skip') or fail it (on_oom='fail') when it will not fit the GPU "
           "(--memguard-gpu).")

_estimate_key = pytest.StashKey["MemoryEstimate"]()
_gpu_key = pytest.StashKey["tuple[DeviceSpec, DeviceMemory]"]()
READERS = pytest.StashKey["Readers"]()
"""Where the plugin reads device memory (:class:`memguard.device.Readers`); absent: this machine."""
_cache_key = pytest.StashKey["Cached[MemoryEstimate]"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memguard", "memory checks of GPU tests (memguard)")
    group.addoption("--memguard-gpu", default=None, metavar="GPU",
                    help="the GPU tests marked memguard must fit, as memguard --gpu reads it: auto (this "
                         "machine's CUDA device, the default), a CUDA index (0, cuda:1), a catalog name such "
                         "as A100-40GB, a size such as 24GiB, a share such as 80%% of the CUDA device, or cpu")
    group.addoption("--memguard-check-only", action="store_true", default=False,
                    help="check every test marked memguard, then skip those that fit instead of "
                         "running them (for runners without the GPU)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER)
    option = config.getoption("memguard_gpu", None)
    if option is not None and option.strip().lower() != "auto":  # auto: this machine's GPU, read before each test
        from memguard.device import FORMS, DeviceSpec
        from memguard.errors import ConfigError, MemguardError

        try:
            if not option.strip():
                raise ConfigError(f"cannot read {option!r} as a GPU; expected {FORMS}")
            spec = DeviceSpec.parse(option)
            config.stash[_gpu_key] = (spec, spec.read(config.stash.get(READERS, None), training=DeviceSpec.cuda()))
        except MemguardError as exc:
            raise pytest.UsageError(f"--memguard-gpu {option}: {exc}") from None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Estimate the marked test's step, before its fixtures, and skip or fail it if it cannot fit."""
    marker = item.get_closest_marker("memguard")
    if marker is None:
        return
    from memguard.errors import MemguardError
    from memguard.fit import Fit

    kwargs, margin, on_oom = _read_marker(marker)
    gpu = _gpu_for_test(item.config)
    _refuse_bf16(gpu, kwargs.get("precision"))
    try:
        fit = Fit(_estimate(item.config, kwargs), gpu.free_bytes, margin, gpu.name)
    except MemguardError as exc:
        pytest.fail(f"memguard: {exc}", pytrace=False)
    item.stash[_estimate_key] = fit.estimate
    if not fit.fits:
        message = f"memguard: {_verdict(fit)}\n{fit.estimate.table()}"
        if on_oom == "fail":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    if item.config.getoption("memguard_check_only", False):
        pytest.skip(f"memguard: fits; not run (--memguard-check-only): {_verdict(fit)}")


@pytest.fixture
def memguard_estimate(request: pytest.FixtureRequest) -> MemoryEstimate:
    """The :class:`~memguard.MemoryEstimate` of the test's ``@pytest.mark.memguard``."""
    est = request.node.stash.get(_estimate_key, None)
    if est is None:
        pytest.fail("the memguard_estimate fixture needs @pytest.mark.memguard(model, ...) on the test",
                    pytrace=False)
    return est


def _read_marker(marker: pytest.Mark) -> tuple[dict[str, Any], float, str]:
    """The estimate's arguments, the margin and ``on_oom`` of a ``memguard`` marker."""
    import importlib
    import inspect

    from memguard.errors import ConfigError
    from memguard.fit import check_margin

    kwargs = dict(marker.kwargs)
    if marker.args:
        names = ("model", "batch_size", "seq_len")
        if len(marker.args) > len(names):
            pytest.fail(f"@pytest.mark.memguard takes at most {len(names)} positional arguments "
                        f"({', '.join(names)}); got {len(marker.args)}", pytrace=False)
        for name, value in zip(names, marker.args, strict=False):
            if name in kwargs:
                pytest.fail(f"@pytest.mark.memguard got {name} twice", pytrace=False)
            kwargs[name] = value
    if "model" not in kwargs:
        pytest.fail("@pytest.mark.memguard needs the model: @pytest.mark.memguard('gpt2', batch_size=8, ...)",
                    pytrace=False)
    margin = kwargs.pop("margin", 0.1)
    on_oom = kwargs.pop("on_oom", "skip")
    if on_oom not in _ON_OOM:
        pytest.fail(f"@pytest.mark.memguard: on_oom must be 'skip' or 'fail', got {on_oom!r}", pytrace=False)
    try:
        margin = check_margin(margin)
    except ConfigError as exc:
        pytest.fail(f"@pytest.mark.memguard: {exc}", pytrace=False)
    accepted = set(inspect.signature(importlib.import_module("memguard.estimation.estimator").estimate).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        pytest.fail(f"@pytest.mark.memguard: unknown argument(s) {', '.join(unknown)}; it takes "
                    f"{', '.join(sorted(accepted | set(_OWN)))}", pytrace=False)
    return kwargs, margin, on_oom


def _gpu_for_test(config: pytest.Config) -> DeviceMemory:
    """The GPU the test must fit; a fixed one from ``--memguard-gpu``, else this machine's, read now."""
    fixed = config.stash.get(_gpu_key, None)
    if fixed is not None and not fixed[1].device:  # a catalog GPU, a size, a share: read once
        return fixed[1]
    from memguard.device import DeviceSpec
    from memguard.errors import DeviceError

    try:
        gpu = (DeviceSpec.cuda() if fixed is None else fixed[0]).read(config.stash.get(READERS, None))
    except DeviceError as exc:
        if fixed is not None:
            pytest.fail(f"memguard: {exc}", pytrace=False)
        pytest.skip("memguard: no GPU visible, and this test trains on one; to check it against a GPU "
                    "here, run pytest --memguard-gpu A100-40GB (a catalog name) or --memguard-gpu 24GiB")
    return _with_cached_blocks(gpu)


def _refuse_bf16(gpu: DeviceMemory, precision: Any) -> None:
    """Fail a bf16 test on a card without bf16 (:func:`memguard.device.catalog.bf16_problem`), as ``check`` does."""
    from memguard.device.catalog import bf16_problem

    problem = bf16_problem(gpu.name, precision)
    if problem is not None:
        pytest.fail(f"memguard: precision={precision!r} on {gpu.name}: {problem.split('. Use --precision')[0]}; "
                    "mark the test with precision='16-mixed' or '32-true' for this card", pytrace=False)


def _with_cached_blocks(gpu: DeviceMemory) -> DeviceMemory:
    """Add back what this process's caching allocator reserves but does not use on ``gpu``."""
    import dataclasses
    import sys

    torch = sys.modules.get("torch")
    if torch is None or gpu.index is None or not torch.cuda.is_initialized():
        return gpu
    try:
        cached = torch.cuda.memory_reserved(gpu.index) - torch.cuda.memory_allocated(gpu.index)
    except Exception:  # a broken CUDA here must not hide the free memory NVML read
        return gpu
    return dataclasses.replace(gpu, free_bytes=min(gpu.total_bytes, gpu.free_bytes + max(0, cached)))


def _estimate(config: pytest.Config, kwargs: dict[str, Any]) -> MemoryEstimate:
    """``memguard.estimate(**kwargs)``, remembered for the session when the arguments are hashable."""
    cache: Cached[MemoryEstimate] | None = config.stash.get(_cache_key, None)
    if cache is None:
        import memguard
        from memguard._cache import cached

        cache = config.stash[_cache_key] = cached(lambda **kw: memguard.estimate(**kw))
    return cache(**kwargs)


def _verdict(fit: Fit) -> str:
    """``"gpt2 (batch 8, seq 1024, 32-true, adamw) does not fit NVIDIA L4: needs ..., has ... usable (...)"``."""
    inputs = fit.estimate.inputs
    what = (f"{inputs.get('model')} (batch {inputs.get('batch_size')}, seq {inputs.get('seq_len')}, "
            f"{inputs.get('precision')}, {inputs.get('optimizer')})")
    return f"{what} {'fits' if fit.fits else 'does not fit'} {fit.where}: {fit.needs()}"
