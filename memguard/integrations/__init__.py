"""memguard for training loops other than Lightning's.

Each submodule wires memguard into one framework and imports that framework itself, so importing
``memguard`` (or this package) imports none of them:

* :mod:`memguard.integrations.transformers`: ``MemGuardCallback`` for ``transformers.Trainer``.
"""

from __future__ import annotations

__all__: list[str] = []
