"""memguard for training loops other than Lightning's.

Each submodule wires memguard into one framework and imports that framework itself, so importing
``memguard`` (or this package) imports none of them:

* :mod:`memguard.integrations.transformers`: ``MemGuardCallback`` for ``transformers.Trainer``, an
  adapter over the guard core (:mod:`memguard.guard`); :mod:`memguard.integrations.trainer_view`
  reads the Trainer's run in memguard's terms.

Lightning Fabric has its own entry, :func:`memguard.fabric.preflight`.
"""

from __future__ import annotations

__all__: list[str] = []
