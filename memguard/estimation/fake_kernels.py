"""Where torch's fake (meta) kernels refuse what the real kernels run, and what the trace runs instead.

The trace runs every op on its fake kernel (``torch/_meta_registrations.py``). A fake kernel that
checks more than the kernel the step will run makes a step that trains fine fail to trace; each
entry of :data:`CORRECTIONS` gives such an op the output its real kernel makes, and cites it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CORRECTIONS", "corrected"]


def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> Any:
    """``aten._grouped_mm`` outside bf16 (transformers' default ``grouped_mm`` experts in fp32, or
    under ``bf16-mixed`` autocast, whose lists leave ``_grouped_mm`` out, so its inputs stay fp32).

    The meta kernel (``_meta_grouped_mm_common`` in ``torch/_meta_registrations.py``) copies the
    checks of the CUDA fast path and demands bf16; the kernels themselves take any matching
    floating dtype: the CPU's ``_grouped_mm`` and CUDA's ``_grouped_mm_cuda``
    (``aten/src/ATen/native/cuda/GroupedBlas.cpp``) run ``_grouped_mm_fallback``
    (``aten/src/ATen/native/GroupedMMUtils.h``: one ``mm``/``bmm`` per group into the output)
    whenever the inputs are not bf16. The output is what ``create_grouped_gemm_output_tensor``
    makes: the shape of ``_create_grouped_mm_output_tensor`` in ``_meta_registrations.py``, in
    ``out_dtype`` or ``mat_a``'s dtype; the fallback allocates nothing else.

    ``None`` (take the fake kernel) for bf16 inputs or mismatched dtypes, whose error is the real one.
    """
    if mat_a.dtype == torch.bfloat16 or mat_a.dtype != mat_b.dtype or not mat_a.is_floating_point():
        return None
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if a2 and b2:
        size = [offs.size(0) if offs is not None else 1, mat_a.size(0), mat_b.size(1)]
    elif a2:
        size = [mat_a.size(0), mat_b.size(-1)]
    elif b2:
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    return torch.empty(size, dtype=out_dtype or mat_a.dtype, device=mat_a.device)


CORRECTIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten._grouped_mm.default: _grouped_mm,
}
"""op -> its correction: returns the output, or ``None`` to take the fake kernel."""


def corrected(func: Any, args: Any, kwargs: Any) -> Any:
    """The corrected output of ``func``, or ``None`` when its fake kernel is right. Called inside
    the trace's dispatch mode, so the tensors it makes are fake and counted."""
    fix = CORRECTIONS.get(func)
    return None if fix is None else fix(*args, **kwargs)
