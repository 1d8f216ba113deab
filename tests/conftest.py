from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """transformers logs a line per model built from a bare config; keep test output readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
