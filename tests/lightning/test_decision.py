"""memguard.lightning.decision: what the guard does, from every rank's report, without a Trainer."""

from __future__ import annotations

import pytest

from memguard.lightning.decision import Decision, RankReport, Verdict, decide

FITS = RankReport(True, True, 8, 100, 200)
TOO_BIG = RankReport(True, False, 3, 300, 200)
NONE_FIT = RankReport(True, False, 0, 300, 200)


def test_a_report_crosses_ranks_as_integers() -> None:
    assert RankReport.from_row(TOO_BIG.to_row()) == TOO_BIG
    assert RankReport(False).to_row() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("action", ["warn", "raise", "reduce"])
def test_a_step_that_fits_everywhere_trains_as_asked(action: str) -> None:
    assert decide(action, 8, 2, [FITS, FITS], can_change_batch=True) == Decision(Verdict.FITS, 8, 2)


@pytest.mark.parametrize(("action", "verdict"), [("warn", Verdict.WARN), ("raise", Verdict.RAISE)])
def test_warn_and_raise_name_the_ranks_that_do_not_fit(action: str, verdict: Verdict) -> None:
    assert decide(action, 8, 1, [FITS, TOO_BIG], can_change_batch=True) == Decision(verdict, 8, 1, (1,))


def test_reduce_takes_the_largest_batch_every_rank_fits_and_keeps_the_effective_batch() -> None:
    got = decide("reduce", 8, 1, [FITS, TOO_BIG], can_change_batch=True)
    assert got == Decision(Verdict.REDUCE, 2, 4, (1,), 3)  # 8 = 2 x 4: a divisor in [1.5, 3]


def test_reduce_after_the_loader_was_built_only_says_what_would_fit() -> None:
    got = decide("reduce", 8, 1, [TOO_BIG], can_change_batch=False)
    assert (got.verdict, got.batch_size, got.accumulate) == (Verdict.STREAM, 2, 4)


def test_reduce_stops_when_not_even_one_fits_on_some_rank() -> None:
    got = decide("reduce", 8, 1, [TOO_BIG, NONE_FIT], can_change_batch=True)
    assert (got.verdict, got.too_big) == (Verdict.NONE_FIT, (1,))


def test_a_rank_that_could_not_estimate_leaves_every_rank_unchecked() -> None:
    got = decide("reduce", 8, 1, [TOO_BIG, RankReport(False)], can_change_batch=True)
    assert got == Decision(Verdict.UNCHECKED, 8, 1, unchecked=(1,))
