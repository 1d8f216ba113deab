"""Where the guard's decision used to live; it is now :mod:`memguard.guard.decision`, shared by every guard.

Kept so that ``from memguard.lightning.decision import decide`` goes on working.
"""

from __future__ import annotations

from memguard.guard.config import ACTIONS, check_arguments
from memguard.guard.decision import Decision, RankReport, Verdict, decide

__all__ = ["ACTIONS", "Decision", "RankReport", "Verdict", "check_arguments", "decide"]
