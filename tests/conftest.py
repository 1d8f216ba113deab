from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """transformers logs a line per model built from a bare config; keep test output readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def pinned_cpu() -> Iterator[None]:
    """Make freed tensor buffers go back to the OS, so that RSS follows live tensors; one thread.

    For the modules that compare CPU measurements with estimates (``pytestmark =
    pytest.mark.usefixtures("pinned_cpu")``). Memory the earlier tests of this process freed stays in
    malloc's arenas, where a fit would reuse it without growing RSS: it is given back first. A tiny
    model gains nothing from more threads, and on a busy machine they wait for each other.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("glibc is needed to measure CPU memory")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
