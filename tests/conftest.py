from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """transformers logs a line per model built from a bare config; keep test output readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
