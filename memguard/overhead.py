"""What a device needs beyond live tensors.

On a GPU, ``nvidia-smi`` shows more than ``torch.cuda.max_memory_allocated()``: the CUDA context,
cuBLAS/cuBLASLt workspaces, and the caching allocator's reserved-but-unallocated blocks
(../shared/REFERENCES.md, "What the GPU adds beyond tensors"). On the CPU, the estimate is the
growth of resident memory, and there is nothing to add.
"""

from __future__ import annotations

__all__ = ["CUDA_CONTEXT_BYTES", "CUDA_WORKSPACE_BYTES", "FRAGMENTATION", "device_overhead"]

CUDA_CONTEXT_BYTES = 500 * 2**20
"""CUDA context with lazy module loading (the default since torch 1.13): PyTorch maintainers give
300-500 MB; we take the upper end."""

CUDA_WORKSPACE_BYTES = 8 * 2**20 + 32 * 2**20
"""One cuBLAS workspace (8 MiB by default) and one cuBLASLt workspace (32 MiB on Hopper, the
largest documented size), for the one stream a training step uses."""

FRAGMENTATION = 0.05
"""Reserved-but-unallocated share of the caching allocator: requests round up to 2 MiB segments
(20 MiB for 1-10 MiB requests), and freed blocks stay reserved until ``empty_cache()``."""


def device_overhead(device: str, peak_bytes: int) -> int:
    """Bytes a training step needs on ``device`` beyond its peak of live tensors.

    Args:
        device: ``"cuda"`` or ``"cpu"``.
        peak_bytes: the estimated peak of live tensors.
    """
    if device != "cuda":
        return 0
    return CUDA_CONTEXT_BYTES + CUDA_WORKSPACE_BYTES + int(peak_bytes * FRAGMENTATION)
