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
    fit = Fit(_estimate(8 * GiB), 10 * GiB, 0.1, "A100-40GB")
    assert fit.fits and fit.usable_bytes == 9 * GiB and fit.spare_bytes == GiB
    assert fit.describe() == ("fits: needs 8.00 GiB of 9.00 GiB usable (10.00 GiB free (A100-40GB) less a 10% "
                              "margin); 1.00 GiB spare")
    short = Fit(_estimate(9 * GiB + 1), 10 * GiB, 0.1)
    assert not short.fits and short.spare_bytes == -1
    assert short.describe().startswith("does not fit: needs 9.00 GiB, has 9.00 GiB usable")
    assert fit.to_dict()["usable_bytes"] == 9 * GiB


def test_the_estimate_and_the_verdict_agree_at_the_boundary() -> None:
    est = _estimate(9 * GiB)
    assert est.fits(10 * GiB, 0.1) is Fit(est, 10 * GiB, 0.1).fits is True
    assert est.fits(10 * GiB - 2, 0.1) is Fit(est, 10 * GiB - 2, 0.1).fits is False
    assert est.fits("10GiB", 0.1)


def test_free_bytes_must_be_bytes() -> None:
    with pytest.raises(ConfigError, match="free_bytes must be a non-negative integer, got -1"):
        Fit(_estimate(1), -1)
