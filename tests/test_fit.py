"""memguard.fit: the one decision of whether a step fits."""

from __future__ import annotations

import pytest

from memguard import Category, ConfigError, MemoryEstimate
from memguard.fit import Fit, check_margin, usable_bytes

GiB = 2**30


def _estimate(total: int) -> MemoryEstimate:
    return MemoryEstimate("formula", {Category.ACTIVATIONS: total})


def test_usable_is_free_less_the_margin() -> None:
    assert usable_bytes(10 * GiB, 0.1) == 9 * GiB
    assert usable_bytes(10 * GiB, 0) == 10 * GiB


@pytest.mark.parametrize("margin", [1, 1.0, -0.1, True, "0.1", float("nan")])
def test_a_bad_margin_is_named(margin: object) -> None:
    with pytest.raises(ConfigError, match="margin must be a number in"):
        check_margin(margin)


def test_fit_says_fits_spare_and_room() -> None:
    """The lines of ``memguard check`` (tests/golden/check_tiny_256MiB.txt) and the pytest plugin."""
    fit = Fit(_estimate(8 * GiB), 10 * GiB, 0.1, "A100-40GB")
    assert fit.fits and fit.usable_bytes == 9 * GiB and fit.spare_bytes == GiB
    assert fit.describe() == ("FITS: needs 8.00 GiB of 9.00 GiB usable (10.00 GiB free less a 10% margin); "
                              "1.00 GiB to spare")
    short = Fit(_estimate(9 * GiB + 1), 10 * GiB, 0.1)
    assert not short.fits and short.spare_bytes == -1
    assert short.needs() == "needs 9.00 GiB, has 9.00 GiB usable (10.00 GiB free less a 10% margin)"
    assert short.describe() == f"DOES NOT FIT: {short.needs()}; 1 B short"
    assert Fit(_estimate(GiB), 2 * GiB, 0).room() == "2.00 GiB free no margin"
    assert fit.to_dict()["usable_bytes"] == 9 * GiB


def test_the_estimate_and_the_verdict_agree_at_the_boundary() -> None:
    est = _estimate(9 * GiB)
    assert est.fits(10 * GiB, 0.1) is Fit(est, 10 * GiB, 0.1).fits is True
    assert est.fits(10 * GiB - 2, 0.1) is Fit(est, 10 * GiB - 2, 0.1).fits is False
    assert est.fits("10GiB", 0.1)


def test_free_bytes_must_be_bytes() -> None:
    with pytest.raises(ConfigError, match="free_bytes must be a non-negative integer, got -1"):
        Fit(_estimate(1), -1)


# -- memguard._cache: the one estimate_at memo --------------------------------------------------


def test_cached_runs_once_per_arguments_and_files_aliases() -> None:
    from memguard._cache import cached

    calls: list[tuple[int, int | None]] = []

    def estimate_at(batch_size: int, seq_len: int | None) -> MemoryEstimate:
        calls.append((batch_size, seq_len))
        est = _estimate(batch_size * GiB)
        return MemoryEstimate(est.method, dict(est.breakdown), inputs={"seq_len": seq_len or 1024})

    at = cached(estimate_at, aliases=lambda args, est: [(args[0], est.inputs["seq_len"])])
    first = at(2, None)
    assert at(2, None) is first and at(2, 1024) is first  # None stood for 1024
    assert at(2, 512) is not first and at(3, None).total_bytes == 3 * GiB
    assert calls == [(2, None), (2, 512), (3, None)] and at.calls == 3


def test_cached_passes_unhashable_arguments_through_and_keeps_no_failure() -> None:
    from memguard._cache import cached

    calls: list[object] = []

    def estimate(**kwargs: object) -> int:
        calls.append(kwargs)
        if kwargs.get("fail"):
            raise ConfigError("bad")
        return len(calls)

    at = cached(estimate)
    assert at(model="gpt2", batch_size=2) == at(batch_size=2, model="gpt2") == 1  # keyword order does not matter
    assert at(model=["unhashable"]) == 2 and at(model=["unhashable"]) == 3  # run every time
    for _ in range(2):
        with pytest.raises(ConfigError):
            at(fail=True)
    assert len(calls) == 5 and len(at) == 1


def test_usable_memory_is_worked_out_in_fit_py_only() -> None:
    """``free * (1 - margin)`` is written once (``memguard.fit.usable_bytes``); a second copy, as
    ``planning/search.py`` once had, fails here."""
    import re
    from pathlib import Path

    import memguard

    package = Path(memguard.__file__).parent
    copies = [str(p.relative_to(package)) for p in package.rglob("*.py")
              if p.name != "fit.py" and re.search(r"\(\s*1(\.0)?\s*-\s*[\w.]*margin\s*\)", p.read_text())]
    assert copies == []
