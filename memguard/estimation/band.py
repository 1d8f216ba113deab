"""The band items that need no trace (torch-free): the cuBLAS workspace of autograd's backward thread,
which every step on a GPU has, and NCCL's communicator buffers, which every rank of more than one has.
:mod:`memguard.estimation.cuda_rules` re-exports them beside the workspaces only a trace sees
(:class:`~memguard.estimation.cuda_rules.Workspaces`); the formula's estimate reads them here."""

from __future__ import annotations

__all__ = ["CUBLAS_BAND_ITEM", "CUBLAS_WORKSPACE_BYTES", "NCCL_BAND_ITEM", "communication_band", "cublas_band",
           "nccl_buffer_bytes"]

CUBLAS_WORKSPACE_BYTES = 32 * 2**20
"""One cuBLAS workspace at its largest default size: ``CUBLAS_WORKSPACE_CONFIG`` unset gives
``:4096:8`` (4096 KiB x 8 = 32 MiB) on compute capability 9.x/10.x and ``:4096:2:16:8`` (8 MiB +
128 KiB) before (``getChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``). PyTorch
keeps one workspace per ``(handle, stream)`` pair (``cublas_handle_stream_to_workspace()``, same
file) and one handle per thread and device (``DeviceThreadHandlePool``, ``thread_local
PoolWindow``); autograd runs CUDA backward ops on its own device thread
(``torch/csrc/autograd/engine.cpp``, one thread per device), whose handle takes a second
workspace. The point estimate counts one workspace (``overhead.CUDA_WORKSPACE_BYTES``); the band
adds the backward thread's, at the larger size since the target GPU's generation is not known here.
cuBLASLt's workspace is taken as the cuBLAS one it shares (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, as
``overhead.CUDA_WORKSPACE_BYTES`` says); a build that gives cuBLASLt its own per handle and stream
would add ``TORCH_CUBLASLT_WORKSPACE_SIZE`` per pair, which this band does not state."""

CUBLAS_BAND_ITEM = "cublas: workspace of autograd's backward thread (8-32 MiB by GPU)"
"""The band's item for :data:`CUBLAS_WORKSPACE_BYTES`."""


def cublas_band() -> dict[str, int]:
    """The band's cuBLAS item of a step that runs a backward pass on a GPU."""
    return {CUBLAS_BAND_ITEM: CUBLAS_WORKSPACE_BYTES}


NCCL_BUFFER_BYTES: dict[str, int] = {"SIMPLE": 1 << 22, "LL": 8 * 512 * 8 * 16, "LL128": 120 * 640 * 8 * 8}
"""The buffers of one NCCL connection, by protocol, at NCCL's defaults (``computeBuffSizes`` in
``src/init.cc``): ``DEFAULT_BUFFSIZE`` (``1 << 22``, 4 MiB, ``NCCL_BUFFSIZE``) for SIMPLE;
``NCCL_LL_LINES_PER_THREAD * NCCL_LL_MAX_NTHREADS * NCCL_STEPS * sizeof(union ncclLLFifoLine)``
(8 x 512 x 8 x 16 = 512 KiB, ``NCCL_LL_BUFFSIZE``) for LL; ``NCCL_LL128_ELEMS_PER_THREAD *
NCCL_LL128_MAX_NTHREADS * NCCL_STEPS * sizeof(uint64_t)`` (120 x 640 x 8 x 8 = 4800 KiB,
``NCCL_LL128_BUFFSIZE``) for LL128 (constants of ``src/include/device.h``). 9,633,792 bytes in all."""

NCCL_CHANNELS = 32
"""Channels of a communicator: NCCL's ``MAXCHANNELS`` (32, ``src/include/device.h``), the most it opens
for a collective and what it opens between NVLink/NVSwitch-connected GPUs (NVIDIA/nccl issue #1685 logs
channels 00 to 31 between two H100s); fewer over PCIe, where it needs less bandwidth. "The memory usage
is linearly tied to the number of channels" (NCCL maintainer, NVIDIA/nccl issue #986), so this is the
upper end."""

NCCL_CONNECTIONS = 2
"""Connections per channel a rank holds buffers for: a ring's two, to the previous and the next rank,
"regardless of the scale" (NVIDIA/nccl issue #986); the tree's connections, or an all-to-all's to every
peer, take more."""


def nccl_buffer_bytes(communicators: int = 1, *, channels: int = NCCL_CHANNELS) -> int:
    """The device memory NCCL's communicators of one rank hold for their connections:
    ``communicators x channels x`` :data:`NCCL_CONNECTIONS` ``x`` the buffers of
    :data:`NCCL_BUFFER_BYTES`, 588 MiB for one communicator at the defaults. NVIDIA/nccl issue #964
    measured 544 MB for a 2-rank and 688 MB for a 4-rank group on A100s with NVLink (PyTorch front end,
    one 4 MB all-reduce each), where this gives 617 MB; issue #1685 saw 3.3 GB more after an
    all-to-all on 8 H100s (32 channels to every peer), which data-parallel training does not run.

    NCCL allocates these with ``cudaMalloc`` or the ``cuMem*`` API (``ncclCudaCalloc``,
    ``src/include/alloc.h``), not through PyTorch's caching allocator: nvidia-smi / NVML and
    ``torch.cuda.mem_get_info`` see them, ``torch.cuda.memory_allocated()`` and ``memory_reserved()``
    do not. They take free memory the allocator can no longer grow into, so they belong to the fit.
    """
    return communicators * channels * NCCL_CONNECTIONS * sum(NCCL_BUFFER_BYTES.values())


NCCL_BAND_ITEM = "nccl: communicator buffers"
"""The start of the band's NCCL item, which lies outside the caching allocator: a comparison with
``max_memory_allocated``/``max_memory_reserved`` leaves it out, one with NVML keeps it."""


def communication_band(world_size: int, communicators: int = 1) -> dict[str, int]:
    """The band's communication items for a rank of ``world_size`` (nothing for one rank).

    Only NCCL's own buffers (:func:`nccl_buffer_bytes`) are uncertain; the rest is in the point
    estimate already (:meth:`memguard.estimation.parallel.Parallelism.extras` and ``phase_extras``):

    * DDP's gradient buckets: ``Reducer`` copies every gradient into flat bucket tensors (with
      ``gradient_as_bucket_view=False``, Lightning's default), so the buckets together are one more
      copy of the trainable gradients, however ``bucket_cap_mb`` (25 MiB by default,
      ``torch/nn/parallel/distributed.py``) and the 1 MiB first bucket (``_DEFAULT_FIRST_BUCKET_BYTES``)
      cut them; the default comm hook all-reduces each bucket in place (``reducer.cpp``), so the
      all-reduce adds nothing through the allocator.
    * FSDP's all-gather outputs (the root unit, the block being computed and the one prefetched) and
      the unsharded gradients of the block being reduce-scattered, phase by phase; DeepSpeed's reduce
      and all-gather buckets (``DEEPSPEED_BUCKET_ELEMENTS``).

    ``communicators``: NCCL communicators the rank uses (hybrid sharding: one within the node and one
    across nodes).
    """
    if world_size <= 1:
        return {}
    what = f"{communicators} communicator{'s' * (communicators > 1)}"
    return {f"{NCCL_BAND_ITEM} ({what} x {NCCL_CHANNELS} channels x {NCCL_CONNECTIONS} connections; "
            "outside the caching allocator: NVML only)": nccl_buffer_bytes(communicators)}
