"""The pytest plugin: marked GPU tests are skipped or failed before they run when they cannot fit.

Inner test sessions run in this process (``pytester.runpytest``), where the plugin is loaded through
its ``pytest11`` entry point as in any project. Most tests replace ``memguard.estimate`` by a fake
of a known size; one runs the real trace of a tiny GPT-2.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest

import memguard
import memguard.estimation.estimator  # the plugin imports it (and torch); see below
from memguard import Category, DeviceMemory, MemoryEstimate
from memguard.pytest_plugin import READERS

sys.path.insert(0, str(Path(__file__).parent))
from _fake_nvml import gpus_seen

# The plugin imports the estimator, and so torch, on the first marked test. Modules first imported
# inside an in-process run are dropped after it, and torch cannot be imported twice in a process:
# imported here, this file passes on its own too, not only after a file that imports torch.

pytest_plugins = ["pytester"]

GIB = 2**30


@pytest.fixture
def fake_estimate(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``memguard.estimate`` returns 2 GiB; the calls are recorded."""
    calls: list[dict] = []

    def estimate(model, batch_size=None, seq_len=None, **kwargs):
        calls.append({"model": model, "batch_size": batch_size, "seq_len": seq_len, **kwargs})
        return MemoryEstimate("formula", {Category.ACTIVATIONS: 2 * GIB},
                              inputs={"model": model, "batch_size": batch_size, "seq_len": seq_len,
                                      "precision": kwargs.get("precision", "32-true"), "optimizer": "adamw"})

    monkeypatch.setattr(memguard, "estimate", estimate)
    return calls


class Machine:
    """A plugin for the inner session that puts the test's readers in the config's stash, before memguard's."""

    def __init__(self, readers: Any) -> None:
        self.readers = readers

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        config.stash[READERS] = self.readers


@pytest.fixture
def no_gpu() -> Machine:
    """A machine without a GPU, whatever machine the tests run on."""
    return Machine(gpus_seen())


@pytest.fixture
def gpu_with_3gib_free() -> Machine:
    return Machine(gpus_seen(DeviceMemory(name="NVIDIA L4", index=0, uuid="GPU-0", total_bytes=22 * GIB,
                                          free_bytes=3 * GIB, used_bytes=19 * GIB, source="nvml")))


def run(pytester: pytest.Pytester, *args: str, machine: Machine | None = None) -> pytest.RunResult:
    """An in-process pytest run, without the plugins that would re-import themselves each time."""
    plugins = [] if machine is None else [machine]
    return pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:cacheprovider", *args, plugins=plugins)


MARKED = """
import pytest

@pytest.mark.memguard("gpt2", batch_size=8, seq_len=1024{extra})
def test_train(memguard_estimate):
    assert memguard_estimate.total_bytes == 2 * 2**30

def test_plain():
    pass
"""


def marked(pytester: pytest.Pytester, extra: str = "") -> None:
    pytester.makepyfile(MARKED.format(extra=extra))


def test_fits_runs_the_test_with_its_estimate(pytester, fake_estimate):
    marked(pytester, ', precision="bf16-mixed"')
    result = run(pytester, "--memguard-gpu", "80GiB", "--strict-markers")
    result.assert_outcomes(passed=2)
    assert fake_estimate == [{"model": "gpt2", "batch_size": 8, "seq_len": 1024, "precision": "bf16-mixed"}]


def test_does_not_fit_skips_with_the_estimate(pytester, fake_estimate):
    marked(pytester)
    result = run(pytester, "--memguard-gpu", "2GiB", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "SKIPPED * memguard: gpt2 (batch 8, seq 1024, 32-true, adamw) does not fit budget of 2.00 GiB: "
        "needs 2.00 GiB, has 1.80 GiB usable (2.00 GiB free less a 10% margin)*",
    ])


def test_does_not_fit_fails_fast_with_on_oom_fail(pytester, fake_estimate):
    marked(pytester, ', on_oom="fail", margin=0.5')
    result = run(pytester, "--memguard-gpu", "3GiB")
    result.assert_outcomes(passed=1, errors=1)  # failed in setup, before any fixture of the test
    result.stdout.fnmatch_lines(["*memguard: gpt2 (batch 8, seq 1024, 32-true, adamw) does not fit budget of "
                                 "3.00 GiB: needs 2.00 GiB, has 1.50 GiB usable (3.00 GiB free less a 50% margin)",
                                 "memguard estimate (formula)", "*activations*2.00 GiB*"])
    assert "Traceback" not in result.stdout.str()


def test_margin_of_the_marker_is_used(pytester, fake_estimate):
    marked(pytester, ", margin=0.5")
    run(pytester, "--memguard-gpu", "4.5GiB").assert_outcomes(passed=2)
    run(pytester, "--memguard-gpu", "3.5GiB").assert_outcomes(passed=1, skipped=1)


def test_without_a_gpu_marked_tests_are_skipped(pytester, fake_estimate, no_gpu):
    marked(pytester)
    result = run(pytester, "-rs", machine=no_gpu)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*memguard: no GPU visible, and this test trains on one*--memguard-gpu A100-40GB*"])
    assert fake_estimate == []  # nothing estimated for a test that cannot run


def test_against_this_machines_gpu(pytester, fake_estimate, gpu_with_3gib_free):
    marked(pytester)
    result = run(pytester, "-rs", machine=gpu_with_3gib_free)  # --memguard-gpu auto
    result.assert_outcomes(passed=2)  # 2 GiB <= 0.9 * 3 GiB
    result = run(pytester, "--memguard-gpu", "auto", "-rs", machine=gpu_with_3gib_free)
    result.assert_outcomes(passed=2)
    marked(pytester, ", margin=0.5")
    result = run(pytester, "-rs", machine=gpu_with_3gib_free)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*does not fit NVIDIA L4: needs 2.00 GiB, has 1.50 GiB usable*"])


def test_check_only_skips_tests_that_fit(pytester, fake_estimate):
    marked(pytester)
    result = run(pytester, "--memguard-gpu", "A100-40GB", "--memguard-check-only", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*memguard: fits; not run (--memguard-check-only): gpt2 * fits A100-40GB*"])


def test_estimates_are_shared_by_tests_with_the_same_marker(pytester, fake_estimate):
    pytester.makepyfile("""
        import pytest
        mark = pytest.mark.memguard(model="gpt2", batch_size=2, seq_len=64)

        @mark
        def test_a(): pass

        @mark
        def test_b(): pass

        @pytest.mark.memguard("gpt2", 4, 64)
        def test_c(): pass
    """)
    run(pytester, "--memguard-gpu", "80GiB").assert_outcomes(passed=3)
    assert [c["batch_size"] for c in fake_estimate] == [2, 4]


@pytest.mark.parametrize(("marker", "message"), [
    ('"gpt2", on_oom="explode"', "on_oom must be 'skip' or 'fail', got 'explode'"),
    ('"gpt2", margin=2', "margin must be a number in [[]0, 1), got 2"),
    ('"gpt2", batch=8', "unknown argument(s) batch; it takes *"),
    ("", "@pytest.mark.memguard needs the model*"),
    ('"gpt2", 1, 2, 3', "@pytest.mark.memguard takes at most 3 positional arguments*"),
    ('"gpt2", model="gpt2"', "@pytest.mark.memguard got model twice"),
])
def test_bad_markers_are_errors_without_traceback(pytester, fake_estimate, marker, message):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.memguard({marker})
        def test_x(): pass
    """)
    result = run(pytester, "--memguard-gpu", "80GiB")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stdout.str()


def test_estimate_errors_are_one_line(pytester, no_gpu):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.memguard("no-such-model", batch_size=1, seq_len=8)
        def test_x(): pass
    """)
    result = run(pytester, "--memguard-gpu", "80GiB", machine=no_gpu)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*memguard: unknown model 'no-such-model'*"])


def test_bad_gpu_option_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, "--memguard-gpu", "H900")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--memguard-gpu H900: unknown GPU 'H900'. Did you mean 'H200' or 'H100-80GB'? "
                                 "Expected auto, a CUDA index*"])


def test_gpu_option_reads_as_the_cli_gpu(pytester, fake_estimate, gpu_with_3gib_free):
    """DeviceSpec reads both: bare digits are a CUDA index, a size needs its unit."""
    marked(pytester)
    result = run(pytester, "--memguard-gpu", "0", "--memguard-check-only", "-rs", machine=gpu_with_3gib_free)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*fits NVIDIA L4: needs 2.00 GiB, has 2.70 GiB usable (3.00 GiB free less a 10% "
                                 "margin)"])
    result = run(pytester, "--memguard-gpu", "50%", "--memguard-check-only", "-rs", machine=gpu_with_3gib_free)
    result.stdout.fnmatch_lines(["*fits 50% of NVIDIA L4: needs 2.00 GiB, has 9.90 GiB usable (11.00 GiB free less*"])
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, "--memguard-gpu", "1.5e9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--memguard-gpu 1.5e9: '1.5e9' is a number without a unit*CUDA index*"])


@pytest.mark.parametrize(("option", "message"), [
    ("0GiB", "budget '0GiB' is no memory at all"),
    ("0B", "budget '0B' is no memory at all"),
    ("0%", "budget '0%' is no memory at all"),
    ("1e400GiB", "memory size '1e400GiB' is larger than any memory"),
])
def test_zero_and_endless_budgets_are_usage_errors(pytester, option, message):  # no device is read for them
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, "--memguard-gpu", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--memguard-gpu {option}: {message}*"])
    assert "Traceback" not in result.stderr.str()


def test_bf16_on_a_card_without_bf16_fails_as_check_refuses_it(pytester, fake_estimate):
    marked(pytester, ', precision="bf16-mixed"')
    result = run(pytester, "--memguard-gpu", "T4", "-rs")
    result.assert_outcomes(passed=1, errors=1)  # failed in setup, as on_oom="fail" does
    result.stdout.fnmatch_lines(["*memguard: precision='bf16-mixed' on T4: T4 has no bfloat16 support (compute "
                                 "capability 7.5; bf16 needs 8.0, Ampere or newer)*mark the test with "
                                 "precision='16-mixed' or '32-true' for this card"])
    assert fake_estimate == []  # refused before it is estimated
    run(pytester, "--memguard-gpu", "A100-40GB").assert_outcomes(passed=2)


def test_fixture_needs_the_marker(pytester):
    pytester.makepyfile("def test_x(memguard_estimate): pass")
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the memguard_estimate fixture needs @pytest.mark.memguard(model, ...)*"])


def test_marker_is_registered(pytester):
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.memguard(model, batch_size=None, seq_len=None, *"])
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["*--memguard-gpu=GPU*", "*--memguard-check-only*"])


@pytest.mark.slow
def test_real_estimate_of_a_tiny_model(pytester):
    """No fake: the trace of a 2-layer GPT-2 on the CPU, 1 MiB vs 80 GiB."""
    # Trace once out here: modules first imported inside an in-process run are dropped after it,
    # and torch refuses to register its operator libraries a second time.
    from transformers import GPT2Config

    memguard.estimate(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16), 1, 8,
                      device="cpu", method="trace")
    pytester.makepyfile("""
        import pytest
        from transformers import GPT2Config

        TINY = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=128)

        @pytest.mark.memguard(TINY, batch_size=2, seq_len=32, device="cpu", method="trace")
        def test_train(memguard_estimate):
            assert memguard_estimate.method == "trace"
            assert 1 * 2**20 < memguard_estimate.total_bytes < 80 * 2**30
    """)
    run(pytester, "--memguard-gpu", "80GiB").assert_outcomes(passed=1)
    result = run(pytester, "--memguard-gpu", "1MiB", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*does not fit budget of 1.00 MiB*"])


def test_plugin_module_imports_only_pytest():
    """The pytest11 entry point loads the module into every pytest run: it must stay cheap."""
    import memguard.pytest_plugin as plugin

    tree = ast.parse(Path(plugin.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module)
    assert top == {"__future__", "typing", "pytest"}
