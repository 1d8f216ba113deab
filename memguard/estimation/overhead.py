"""What a device needs beyond live tensors.

On a GPU, ``nvidia-smi`` shows more than ``torch.cuda.max_memory_allocated()``: the caching
allocator's reserved-but-unallocated blocks and the cuBLAS workspace (both inside
``max_memory_reserved()``), and the CUDA context outside it (../shared/REFERENCES.md, "What the GPU
adds beyond tensors"). On the CPU, the estimate is the growth of resident memory, and there is
nothing to add.
"""

from __future__ import annotations

__all__ = ["CUDA_CONTEXT_BYTES", "CUDA_WORKSPACE_BYTES", "FORMULA_SLACK", "device_overhead"]

CUDA_CONTEXT_BYTES = 500 * 2**20
"""CUDA context with lazy module loading (the default since torch 1.13): PyTorch maintainers give
300-500 MB; we take the upper end. Outside the caching allocator."""

CUDA_WORKSPACE_BYTES = 32 * 2**20
"""The cuBLAS workspace of the step's stream: 32 MiB on compute capability 9.x/10.x (Hopper,
Blackwell), 8 MiB + 128 KiB before (``getChosenWorkspaceSize`` in ATen's
``cuda/CublasHandlePool.cpp``); taken through the caching allocator, and shared by cuBLASLt
(``TORCH_CUBLASLT_UNIFIED_WORKSPACE``), so counted once, at the larger size."""

FORMULA_SLACK = 0.08
"""Reserved beyond allocated when there is no trace to replay (the formula): replaying traced
steps through :mod:`memguard.estimation.allocator` gave +8.4% for GPT-2 small at batch 8 x 1024 bf16-mixed
(``benchmarks/allocator.py``); the formula takes 8%."""


def device_overhead(device: str, peak_bytes: int, slack: int | None = None) -> tuple[int, int]:
    """Bytes a training step needs on ``device`` beyond its peak of live tensors.

    Args:
        device: ``"cuda"`` or ``"cpu"``.
        peak_bytes: the estimated peak of live tensors.
        slack: what the caching allocator reserves beyond the tensors, from a replay of the step;
            ``None`` takes :data:`FORMULA_SLACK` of the peak.

    Returns:
        The overhead, and the part of it outside the caching allocator (the CUDA context).
    """
    if device != "cuda":
        return 0, 0
    if slack is None:
        slack = int(peak_bytes * FORMULA_SLACK)
    return CUDA_CONTEXT_BYTES + CUDA_WORKSPACE_BYTES + slack, CUDA_CONTEXT_BYTES
