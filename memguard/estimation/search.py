"""The largest batch size that fits, found on the estimator instead of on the GPU.

Lightning's ``BatchSizeFinder`` and accelerate's ``find_executable_batch_size`` try sizes on the
device until one runs out of memory. Here each try is an estimate, which costs no device memory
and runs on a machine without the GPU. Memory grows with batch size as the maximum of a few affine
functions (one per phase of the step: forward, backward, optimizer), so the search extrapolates
along the secant of the last two tries (regula falsi) and bisects when that stalls; a handful of
estimates settle it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

from memguard.errors import ConfigError
from memguard.estimation.result import MemoryEstimate
from memguard.fit import Fit, usable_bytes

__all__ = ["BatchSearch", "max_batch_size", "reduced_batch"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    """The outcome of :func:`max_batch_size`.

    Attributes:
        batch_size: the largest batch size that fits, or 0 when even 1 does not.
        estimate: the estimate at ``batch_size`` (at 1 when nothing fits).
        trials: every batch size estimated, with the bytes the fit decision compares
            (:attr:`memguard.fit.Fit.needed_bytes`: the upper end of the estimate's band), in order.
        capped: true when the search stopped at ``limit`` while still fitting.
    """

    batch_size: int
    estimate: MemoryEstimate
    trials: tuple[tuple[int, int], ...]
    capped: bool = False


def max_batch_size(estimate_at: Callable[[int], MemoryEstimate], free_bytes: int, *,
                   margin: float = 0.1, limit: int = 1 << 16) -> BatchSearch:
    """Find the largest batch size whose estimate fits ``free_bytes`` keeping ``margin`` spare.

    Args:
        estimate_at: returns the estimate for a batch size.
        free_bytes: memory available on the device.
        margin: share of ``free_bytes`` to keep spare, as in :meth:`MemoryEstimate.fits`.
        limit: the largest batch size considered.

    Returns:
        A :class:`BatchSearch`. Assumes memory does not shrink as the batch grows.
    """
    if limit < 1:
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    budget = usable_bytes(free_bytes, margin)
    cache: dict[int, MemoryEstimate] = {}
    trials: list[tuple[int, int]] = []

    needed: dict[int, int] = {}

    def total(b: int) -> int:
        if b not in cache:
            cache[b] = estimate_at(b)
            needed[b] = Fit(cache[b], free_bytes, margin).needed_bytes  # the one place that says what is compared
            trials.append((b, needed[b]))
            log.info("batch size %d: %d bytes (budget %d)", b, needed[b], int(budget))
        return needed[b]

    if total(1) > budget:
        return BatchSearch(0, cache[1], tuple(trials))
    if limit == 1:
        return BatchSearch(1, cache[1], tuple(trials), capped=True)
    prev, lo, probe = 1, 1, 2  # lo fits; hi, once known, does not
    while True:
        if total(probe) > budget:
            hi = probe
            break
        prev, lo = lo, probe
        if lo >= limit:
            return BatchSearch(lo, cache[lo], tuple(trials), capped=True)
        # Extrapolate along the secant through the last two fitting tries.
        slope = max(1.0, (total(lo) - total(prev)) / (lo - prev))
        guess = lo + int((budget - total(lo)) / slope)
        probe = min(limit, max(lo + 1, guess))
    last_width = None
    while hi - lo > 1:
        # Regula falsi inside the bracket; bisect when the last step did not halve the bracket.
        width = hi - lo
        if last_width is None or 2 * width <= last_width:
            a, b = total(lo), total(hi)
            mid = min(hi - 1, max(lo + 1, lo + int((budget - a) * width / max(1, b - a))))
        else:
            mid = (lo + hi) // 2
        last_width = width
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return BatchSearch(lo, cache[lo], tuple(trials))


def reduced_batch(requested: int, accumulate: int, largest: int) -> tuple[int, int]:
    """The batch size and gradient accumulation to train with when at most ``largest`` samples fit.

    The effective batch ``E = requested * accumulate`` is kept exactly when ``E`` has a divisor
    ``d`` with ``largest / 2 <= d <= largest``: the largest such ``d``, with ``E / d`` micro-batches
    (asked 64, 11 fit: 8 x 8). Otherwise (a prime ``E`` ...) the fewest micro-batches of at most
    ``largest`` samples, as even as they can be: ``a = ceil(E / largest)`` of ``ceil(E / a)``, an
    effective batch of at least ``E`` (asked 7, 3 fit: 3 x 3 = 9). ``requested`` itself is returned
    with ``accumulate`` when it fits.

    Returns:
        ``(batch_size, accumulate_grad_batches)``.
    """
    if min(requested, accumulate, largest) < 1:
        raise ConfigError(f"batch sizes and accumulation must be positive, got {requested}, {accumulate}, {largest}")
    if requested <= largest:
        return requested, accumulate
    effective = requested * accumulate
    for d in range(largest, (largest + 1) // 2 - 1, -1):
        if d >= largest / 2 and effective % d == 0:
            return d, effective // d
    acc = math.ceil(effective / largest)
    return math.ceil(effective / acc), acc
