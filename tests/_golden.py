"""Golden files: text a user reads (tables, messages) compared byte for byte with ``tests/golden/``.

After a deliberate change of an estimate, a message or a table, regenerate the files and review the
diff before committing it::

    MEMGUARD_UPDATE_GOLDEN=1 python -m pytest -q tests/cli tests/guard

With ``MEMGUARD_UPDATE_GOLDEN`` unset (CI, everyone else) a missing file or any difference fails.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(name: str, text: str) -> None:
    """Assert ``text`` is ``tests/golden/<name>``; with ``MEMGUARD_UPDATE_GOLDEN=1`` write it first."""
    path = GOLDEN / name
    if os.environ.get("MEMGUARD_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with MEMGUARD_UPDATE_GOLDEN=1 (see tests/_golden.py)"
    assert text == path.read_text(), (f"output differs from {path}; after a deliberate change regenerate it with "
                                      "MEMGUARD_UPDATE_GOLDEN=1 (see tests/_golden.py) and review the diff")
