"""``python -m memguard``: the same as the ``memguard`` command."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    try:
        from memguard.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the command is still loading
        sys.stderr.write("memguard: interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(main())
