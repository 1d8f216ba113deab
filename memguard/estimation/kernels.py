"""Fake kernels that misreport memory, corrected where the trace records an op's outputs.

Under ``FakeTensorMode`` an op's outputs come from its meta kernel, which knows their shapes but not
always the buffers the real kernel makes. Where the real kernel returns a buffer that autograd keeps
for the backward and the meta kernel returns it empty, :func:`corrected` gives it its real size, so
the ledger counts it from the forward to the backward as the real step holds it.

Corrected:
    * ``aten::mkldnn_rnn_layer`` (the CPU LSTM: ``aten::lstm`` takes oneDNN's kernel for fp32 CPU
      tensors, ``use_mkldnn`` in ``aten/src/ATen/native/RNN.cpp``). Its meta kernel returns an empty
      workspace (``torch/_meta_registrations.py``, ``mkldnn_rnn_layer``); the real one allocates the
      workspace of oneDNN's ``forward_training`` primitive (``aten/src/ATen/native/mkldnn/RNN.cpp``),
      which autograd saves for ``mkldnn_rnn_layer_backward``. Its size: :func:`mkldnn_lstm_workspace`.
      It is the allocation, what a GPU's allocator would count. The CPU's resident memory grows
      as pages are written: the forward writes about a third of it (the gates of every step and the
      cell states; the hidden states go to the output tensor), the backward the rest beside a
      scratchpad of its own (about 110 MiB transient for one 512-wide layer over 256 x 16 tokens,
      measured from ``VmHWM``), so a CPU estimate of an LSTM is high by up to the unwritten share
      (+26% on the ``lstm`` benchmark case, -61% without the workspace).

Known but not corrected:
    * Buffers a CPU kernel makes and frees inside one op: no tensor holds them, so a trace on fake
      tensors cannot see them. The largest are the convolutions' (``mkldnn_convolution``: ideep
      reorders plain NCHW tensors to oneDNN's blocked layout and back). Measured per op from
      ``VmHWM`` on the ``vae-small`` case (64-128 channels, 4 x 128 x 128): up to 31.8 MiB inside a
      forward convolution (a blocked copy of its input and of its output, 16 MiB each) and 47.9 MiB
      inside a backward (grad_output, input and grad_input); 2 MiB on ``sd3-small``. A depthwise
      7 x 7 backward holds about 22 MiB (ConvNeXt, -6%). diffusers' ``AutoencoderKL`` is -2.3% for
      them while the trace equals the live tensors of a real step within 0.3%. The reorders are
      ``mkldnn_convolution``'s (``aten/src/ATen/native/mkldnn/Conv.cpp``, the note above it: for a
      contiguous NCHW tensor "input reorder: NCHW(user) -> Blocked(internal) ... output reorder:
      Blocked(internal) -> NCHW(user)"; the output is ``mkldnn_to_dense`` of ideep's blocked ``y``;
      ``mkldnn_convolution_backward_input`` and ``_weights`` reorder ``grad_output`` and the input
      again, each in its own call). ``ONEDNN_VERBOSE=1`` on an AVX2 host shows the blocked layout
      (``aBcd8b``, ``jit:avx2``) and four reorders into it and two out of it per convolution and step;
      AVX-512 hosts block by 16, and channels-last tensors are viewed, not reordered. Measured with
      ``VmHWM`` on one 64 -> 64 3 x 3 convolution over 4 x 64 x 128 x 128 fp32 (16 MiB) on that AVX2
      host: the forward holds 16 MiB beside its output in NCHW, none in channels-last; the backward
      34-66 MiB beside ``grad_input`` in either (the reorders and the backward-weights scratchpad,
      whose size oneDNN's ``jit:avx2`` kernel sets). Not corrected: they live inside one op, and the
      trace records only what ops return; a correction needs the ledger to hold a transient at an op.
      ``sd3-small`` (-3.7%) has no such op over 2 MiB: its residue is outside the ops (the heap's
      small blocks, below the 64 KiB mmap threshold), not yet explained; the forward of its CPU
      attention (``_scaled_dot_product_flash_attention_cpu``) keeps one block of
      ``qSplitSize x (kvSplitSize + headSize + 2)`` floats per thread (``cpu_flash_attention`` in
      ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``: 64 x (333 + 32 + 2) over 333 tokens of
      32-wide heads, 94 KiB a thread), too little to explain it.

Named in the estimate's notes (see :func:`uncounted`):
    * On a GPU, cuDNN's RNN reserve space (``_cudnn_rnn``'s ``reserve`` output, sized by
      ``cudnnGetRNNTempSpaceSizes`` inside the closed cuDNN library): the CUDA trace runs the CPU's
      kernel and counts its oneDNN workspace in its place, of the same order (gates and states of
      every time step) but not the same size.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["corrected", "mkldnn_lstm_workspace", "uncounted"]

_PAGE = 4096
"""oneDNN aligns every part of an RNN workspace to a page (``rnn_utils::set_offsets``)."""

_LSTM_MODE = 2
"""``mode`` of ``mkldnn_rnn_layer`` for an LSTM (``torch/nn/modules/rnn.py``: ``_rnn_impls``; the
mode numbers of ``aten/src/ATen/native/RNN.h``: RNN_RELU 0, RNN_TANH 1, LSTM 2, GRU 3)."""


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def _good_ld(dim: int, elem: int) -> int:
    """oneDNN's leading dimension of a workspace matrix (``rnn_utils::get_good_ld``): a multiple of
    64 bytes, moved off multiples of 256 elements (4K aliasing)."""
    ld = _up(dim, 64 // elem)
    return ld + 64 // elem if ld % 256 == 0 else ld


def mkldnn_lstm_workspace(steps: int, batch: int, input_size: int, hidden: int, elem: int = 4) -> int:
    """Bytes of the workspace oneDNN's LSTM keeps for the backward of one layer in one direction.

    ``aten::mkldnn_rnn_layer`` runs one layer and one direction (``n_layer = n_dir = 1``) over
    ``steps`` time steps. oneDNN's ``rnn_utils::set_workspace_sizes`` and ``set_offsets``
    (``src/cpu/rnn/rnn_utils.{hpp,cpp}``, oneDNN 3.x as torch 2.x bundles it) lay out, each part
    starting on a page:

    * the gates of every step: ``steps x batch x good_ld(4 h)`` fp32;
    * the hidden output of every step: ``steps x batch x good_ld(h)``;
    * three regions of states, ``(n_layer + 1) x (steps + 1) x batch x good_ld(max(input, h))``
      (the layer states, and the iteration states that ``set_offsets`` registers twice);
    * the cell states and their gradients: ``(n_layer + 1) x (steps + 1) x batch x h`` each, the
      gradients in fp32.

    The total is a whole number of pages. Checked against the real kernel's workspace on the
    torch this runs with (``tests/estimation/test_kernels.py``).
    """
    states = 2 * (steps + 1) * batch
    parts = (
        steps * batch * _good_ld(4 * hidden, 4) * 4,
        steps * batch * _good_ld(hidden, elem) * elem,
        *(states * _good_ld(max(input_size, hidden), elem) * elem,) * 3,
        states * hidden * elem,
        states * hidden * 4,
    )
    offset = 0
    for part in parts:
        offset = _up(offset, _PAGE) + part
    return _up(offset, _PAGE)


def _mkldnn_rnn_layer(args: tuple[Any, ...], out: Any) -> Any:
    """``mkldnn_rnn_layer``'s outputs with a workspace of the real size, when training an LSTM.

    Args as in ``aten/src/ATen/native/native_functions.yaml``: ``input, weight0..3, hx_, cx_,
    reverse, batch_sizes, mode, hidden_size, num_layers, has_biases, bidirectional, batch_first,
    train``; the input comes time-major, ``(steps, batch, input_size)``, from ``mkldnn_impl``.
    """
    x, mode, hidden, train = args[0], args[9], args[10], args[15]
    output, hy, cy, workspace = out
    if not train or mode != _LSTM_MODE or workspace.numel() or x.dim() != 3:
        return out
    steps, batch, input_size = x.shape
    n = mkldnn_lstm_workspace(int(steps), int(batch), int(input_size), int(hidden), x.element_size())
    return output, hy, cy, output.new_empty((n,), dtype=torch.uint8)


_CORRECTIONS = {torch.ops.aten.mkldnn_rnn_layer.default: _mkldnn_rnn_layer}


def corrected(func: Any, args: tuple[Any, ...], out: Any, device: str) -> Any:
    """``out`` of ``func(*args)`` as the real kernel of ``device`` makes it (see the module docstring).

    Called by the trace's dispatch mode on every op, under the fake mode: a corrected output is a
    fake tensor. On ``"cuda"`` the CPU kernel's buffers stand in for the GPU's (:func:`uncounted`).
    """
    del device  # the same corrections for both: the CUDA trace runs the CPU's kernels
    fix = _CORRECTIONS.get(func)
    return out if fix is None else fix(args, out)


def uncounted(func: Any, device: str) -> str | None:
    """What the real kernel of ``device`` holds that the trace cannot count, in words, or ``None``."""
    if device == "cuda" and func in _CORRECTIONS:
        return "cuDNN's RNN reserve space (counted as oneDNN's CPU workspace)"
    return None
