"""Whether a step fits: an estimate against the memory it may use, keeping a margin spare.

The one place where that decision is written. What is compared is the upper end of the estimate's
stated band (:attr:`~memguard.estimation.result.MemoryEstimate.upper_bytes`: the total plus what
memguard cannot size exactly for this step, such as cuDNN workspaces), so a guard never lets a step
through on the low side of what it does not know. :meth:`MemoryEstimate.fits`, the batch search, the
``memguard`` command, the pytest plugin, the plot and the Lightning callback all ask :class:`Fit`
(or :func:`usable_bytes`, its arithmetic), so they cannot disagree on what "fits" means.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from memguard.errors import ConfigError
from memguard.units import format_bytes

if TYPE_CHECKING:
    from memguard.estimation.result import MemoryEstimate

__all__ = ["Fit", "check_margin", "usable_bytes"]


def check_margin(margin: Any) -> float:
    """``margin`` as a float in ``[0, 1)``, or a :class:`ConfigError` naming it."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(f"margin must be a number in [0, 1), got {margin!r}")
    return float(margin)


def usable_bytes(free_bytes: int, margin: float) -> int:
    """What a step may use of ``free_bytes``: all of it less the ``margin`` share kept spare."""
    return int(free_bytes * (1 - check_margin(margin)))


@dataclasses.dataclass(frozen=True)
class Fit:
    """An estimate against the memory it may use.

    Attributes:
        estimate: the step's estimate; its :attr:`~MemoryEstimate.upper_bytes` (the total plus the
            uncertain items of its band) is compared.
        free_bytes: the memory available (free on the device, or a budget), before the margin.
        margin: the share of ``free_bytes`` kept spare, in ``[0, 1)``.
        where: where ``free_bytes`` comes from, in words (``"A100-80GB"``, ``"budget of 12 GiB"``); for
            the caller's messages, not part of :meth:`room` or :meth:`describe`.
    """

    estimate: MemoryEstimate
    free_bytes: int
    margin: float = 0.1
    where: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin", check_margin(self.margin))
        if isinstance(self.free_bytes, bool) or not isinstance(self.free_bytes, int) or self.free_bytes < 0:
            raise ConfigError(f"free_bytes must be a non-negative integer, got {self.free_bytes!r}")

    @property
    def usable_bytes(self) -> int:
        """``free_bytes`` less the margin."""
        return usable_bytes(self.free_bytes, self.margin)

    @property
    def needed_bytes(self) -> int:
        """What the step is taken to need: the upper end of the estimate's band."""
        return self.estimate.upper_bytes

    @property
    def fits(self) -> bool:
        """Whether the upper end of the step's band fits what is usable."""
        return self.needed_bytes <= self.usable_bytes

    @property
    def spare_bytes(self) -> int:
        """Usable bytes left over (negative: how much is missing)."""
        return self.usable_bytes - self.needed_bytes

    def room(self) -> str:
        """``"40.00 GiB free less a 10% margin"`` (``"... free no margin"``): what usable is made of."""
        spare = f"less a {self.margin * 100:g}% margin" if self.margin else "no margin"
        return f"{format_bytes(self.free_bytes)} free {spare}"

    def needs(self) -> str:
        """``"needs 536.00 MiB, has 230.40 MiB usable (256.00 MiB free less a 10% margin)"``."""
        return (f"needs {self._need()}, has {format_bytes(self.usable_bytes)} usable "
                f"({self.room()})")

    def describe(self) -> str:
        """The verdict line of ``memguard check``: what the step needs, what is usable, spare or short.

        ``"FITS: needs 8.00 GiB of 9.00 GiB usable (10.00 GiB free less a 10% margin); 1.00 GiB to
        spare"`` or ``"DOES NOT FIT: needs ..., has ... usable (...); ... short"``.
        """
        if self.fits:
            return (f"FITS: needs {self._need()} of {format_bytes(self.usable_bytes)} "
                    f"usable ({self.room()}); {format_bytes(self.spare_bytes)} to spare")
        return f"DOES NOT FIT: {self.needs()}; {format_bytes(-self.spare_bytes)} short"

    def _need(self) -> str:
        """``"8.00 GiB"``, or ``"8.25 GiB (7.90 GiB + 360.00 MiB uncertain)"`` with a band."""
        total, upper = self.estimate.total_bytes, self.needed_bytes
        if upper == total:
            return format_bytes(total)
        return f"{format_bytes(upper)} ({format_bytes(total)} + {format_bytes(upper - total)} uncertain)"

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "needed_bytes": self.needed_bytes, "free_bytes": self.free_bytes,
                "margin": self.margin, "usable_bytes": self.usable_bytes, "spare_bytes": self.spare_bytes,
                "where": self.where}
