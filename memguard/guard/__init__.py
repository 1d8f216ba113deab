"""The guard core: what every framework's guard does, knowing no framework.

The Lightning callback (:class:`memguard.MemGuard`), the transformers ``MemGuardCallback`` and
:func:`memguard.fabric.preflight` are thin adapters: each translates its run into a
:class:`RunView` and a :class:`StepView`, and calls the same functions:

* :class:`GuardConfig`: the arguments, checked once (:mod:`.config`);
* :func:`plan_rank`: one rank's estimate, cached (:mod:`.rank`);
* :func:`agree`: every rank's :class:`RankReport`, through the framework's ``all_gather`` (:mod:`.agreement`);
* :func:`decide`: one :class:`Decision` on every rank, a pure function (:mod:`.decision`);
* :func:`assess` and :func:`act`: the check before the first step, wired together (:mod:`.check`);
* :class:`StepProbe`: predicted vs actual over the first steps (:mod:`.probe`);
* :mod:`.messages`: everything a guard says, in each framework's words (:class:`Framework`).
"""

from __future__ import annotations

from memguard.guard import messages
from memguard.guard.agreement import agree
from memguard.guard.check import Assessment, Training, act, assess
from memguard.guard.config import ACTIONS, GuardConfig, check_arguments
from memguard.guard.decision import Decision, RankReport, Verdict, decide
from memguard.guard.probe import StepProbe
from memguard.guard.rank import RankPlan, estimator, plan_rank, traced
from memguard.guard.view import AllGather, Framework, RunView, StepView, alone

__all__ = [
    "ACTIONS",
    "AllGather",
    "Assessment",
    "Decision",
    "Framework",
    "GuardConfig",
    "RankPlan",
    "RankReport",
    "RunView",
    "StepProbe",
    "StepView",
    "Training",
    "Verdict",
    "act",
    "agree",
    "alone",
    "assess",
    "check_arguments",
    "decide",
    "estimator",
    "messages",
    "plan_rank",
    "traced",
]
