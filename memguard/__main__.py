"""``python -m memguard``: the same as the ``memguard`` command."""

from __future__ import annotations

from memguard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
