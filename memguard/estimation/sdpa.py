"""Which kernel CUDA's ``scaled_dot_product_attention`` runs: flash, memory-efficient, cuDNN or math.

The rules of ``select_sdp_backend`` in ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``,
for a target GPU generation (compute capability), on tensors of any device (the trace's fake CPU
tensors included). :mod:`memguard.estimation.cuda_rules` runs the chosen kernel.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from memguard.enums import StrEnum

__all__ = ["DEFAULT_COMPUTE_CAPABILITY", "SdpaBackend", "sdpa_backend"]


class SdpaBackend(StrEnum):
    """A kernel of CUDA's ``scaled_dot_product_attention`` (``SDPBackend`` in
    ``aten/src/ATen/native/transformers/sdp_utils_cpp.h``): ``str(SdpaBackend.FLASH) == "flash"``."""

    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"
    MATH = "math"

    @property
    def unsized_workspace(self) -> bool:
        """Its backward allocates workspaces memguard cannot size (memory-efficient: fp32
        accumulators; cuDNN: a workspace cuDNN sizes per GPU), stated in the estimate's band."""
        return self in (SdpaBackend.EFFICIENT, SdpaBackend.CUDNN)

DEFAULT_COMPUTE_CAPABILITY = (8, 0)
"""The GPU generation assumed for the SDPA backend choice: sm80 (A100), the most common training
GPU; pass ``(9, 0)`` for an H100, where recent PyTorch builds try cuDNN attention first."""


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, enable_gqa: bool = False, *,
                 compute_capability: tuple[int, int] = DEFAULT_COMPUTE_CAPABILITY) -> SdpaBackend:
    """The backend CUDA's ``scaled_dot_product_attention`` runs: an :class:`SdpaBackend`, ``"flash"``,
    ``"efficient"``, ``"cudnn"`` or ``"math"``.

    ``select_sdp_backend`` of ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``: the first
    backend in priority order, among those ``torch.backends.cuda`` leaves enabled, whose checks
    pass: flash, memory-efficient, math; cuDNN first on sm90/sm100/sm103 with the cuDNN above 9.15
    of recent wheels unless ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` is set. Flash: no mask, fp16/bf16,
    equal head dims up to 256, sm80-sm121, causal only when square, no training with head dims in
    (192, 224] (or above 224 with dropout) on sm86/89/120. Memory-efficient: sm50-sm121, fp32 too
    (bf16 from sm80), head dims and storage offsets aligned to ``minimum_gemm_alignment``, any mask
    (one that needs a gradient too). cuDNN: fp16/bf16, head dims up to 128 and divisible by 8, a
    mask that needs no gradient, (B, S, H, D)-strided inputs, dropout a multiple of 1/16.
    """
    cuda = torch.backends.cuda
    major, minor = compute_capability
    if not (query.dim() == key.dim() == value.dim() == 4 and all(t.shape[-2] for t in (query, key, value))):
        return SdpaBackend.MATH
    cudnn_first = major in (9, 10) and minor in (0, 3) and os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "0") == "0"
    order = [(SdpaBackend.FLASH, cuda.flash_sdp_enabled, _flash_ok),
             (SdpaBackend.EFFICIENT, cuda.mem_efficient_sdp_enabled, _efficient_ok)]
    cudnn = (SdpaBackend.CUDNN, cuda.cudnn_sdp_enabled, _cudnn_ok)
    order = [cudnn, *order] if cudnn_first else [*order] + ([] if cuda.math_sdp_enabled() else [cudnn])
    for name, enabled, ok in order:
        if enabled() and ok(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, major * 10 + minor):
            return name
    return SdpaBackend.MATH


def _heads_ok(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> bool:
    """``check_batch_size_and_num_heads_dense`` (``sdp_utils_cpp.h``) with grouped-query support."""
    if enable_gqa:
        return q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
    return q.shape[:2] == k.shape[:2] == v.shape[:2]


def _flash_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool,
              enable_gqa: bool, cc: int) -> bool:
    d = q.shape[-1]
    if mask is not None or not (d == k.shape[-1] == v.shape[-1] <= 256) or not 80 <= cc <= 121:
        return False
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if training and (86 <= cc <= 89 or 120 <= cc <= 121) and not (d <= 192 or (dropout_p == 0 and d > 224)):
        return False
    if is_causal and q.shape[-2] != k.shape[-2]:
        return False
    strides_ok = all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v))
    return (q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and strides_ok and _heads_ok(q, k, v, enable_gqa))


def _gemm_alignment(dtype: torch.dtype, cc: int) -> int:
    """``minimum_gemm_alignment``: elements a head dim must be divisible by."""
    half = dtype in (torch.float16, torch.bfloat16)
    tensor_cores = cc >= 80 or (cc >= 70 and half)
    align = 4 if cc >= 80 else 1
    return max(align, 8 if half else 4) if tensor_cores else align


def _efficient_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool,
                  enable_gqa: bool, cc: int) -> bool:
    if not 50 <= cc <= 121:
        return False
    dtypes = (torch.float16, torch.float32, torch.bfloat16)[:3 if cc >= 80 else 2]
    align = _gemm_alignment(q.dtype, cc)
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % align or v.shape[-1] % align:
        return False
    if cc >= 80 and any(t.storage_offset() * t.element_size() % (align * t.element_size())
                        for t in (q, k, v)):
        return False
    return (q.dtype in dtypes and q.dtype == k.dtype == v.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v)) and _heads_ok(q, k, v, enable_gqa))


def _cudnn_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool,
              enable_gqa: bool, cc: int) -> bool:
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    if not 80 <= cc <= 121 or q.dtype not in (torch.float16, torch.bfloat16) or dropout_p * 16 % 1:
        return False
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return False
    if mask is not None and (mask.requires_grad or mask.dim() not in (2, 4) or any(
            n not in (1, want) for n, want in zip(mask.shape[::-1], (s_k, s_q, h, b), strict=False))):
        return False  # check_attn_mask_shape
    if b > 65535 or h > 65535 or d > 128 or v.shape[-1] > 128 or d % 8 or v.shape[-1] % 8:
        return False
    if s_k == 1 or (dropout_p and s_q == 1) or not _heads_ok(q, k, v, enable_gqa):
        return False

    def layout(t: Tensor, packed: int) -> bool:  # check_cudnn_layout: (B, S, H, D) or packed QKV
        return t.stride() == (t.shape[2] * packed * t.shape[1] * t.shape[3], t.shape[3],
                              packed * t.shape[1] * t.shape[3], 1)

    return all(layout(t, 1) for t in (q, k, v)) or layout(v, 3)
