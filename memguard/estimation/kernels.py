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
      The allocation is what a GPU's allocator would count, and what a ``"cuda"`` estimate keeps.
      The CPU's resident memory grows only as pages are written: the forward writes about a third
      of it (the gates of every step and one states region's rows; the layer's input and output
      are PyTorch's tensors), so on ``"cpu"`` the workspace is counted at
      :func:`mkldnn_lstm_forward_written` from the forward to the backward, and the backward holds
      the rest it writes with its scratchpad and weight reorders, :func:`mkldnn_lstm_backward_transient`,
      as a transient of ``aten::mkldnn_rnn_layer_backward`` (:func:`transient`). Both rules are
      read from the real kernel (``/proc/self/pagemap``, ``VmHWM``; torch 2.13's bundled oneDNN)
      and sit on its high side within 1% on the benchmark's shapes; the ``lstm`` benchmark case
      went from +26.6% (the whole allocation) to +0.09% (-61% without the workspace).

Transient inside an op (held while the op runs, freed before it returns; :func:`transient`):
    * ``aten::convolution`` and ``aten::convolution_backward`` on the CPU's oneDNN backend (what
      ``torch._C._select_conv_backend``, PyTorch's own choice in ``aten/src/ATen/native/Convolution.cpp``,
      calls ``Mkldnn``: fp32 convolutions, and bf16 ones on hosts with AVX-512 bf16). The meta kernel
      knows only the outputs; the real kernel (``aten/src/ATen/native/mkldnn/Conv.cpp``) works on
      internal copies, per its Note [MKLDNN Convolution Memory Formats]: for a contiguous NCHW tensor
      "input reorder: NCHW(user) -> Blocked(internal) ... output reorder: Blocked(internal) ->
      NCHW(user)", a channels-last tensor is viewed, not reordered. :func:`mkldnn_conv_transient`
      writes the sequence of ``mkldnn_convolution`` and ``mkldnn_convolution_backward`` (its
      ``_backward_input`` then ``_backward_weights``, each ``compute`` reordering ``grad_output``
      and the input again and freeing its copies when it returns, each result converted to dense
      by ``mkldnn_to_dense`` beside its blocked original) as phases, and counts the largest phase
      beyond the op's outputs. Blocked layouts pad the channels to oneDNN's block (8 floats on
      AVX2, 16 on AVX-512: ``aBcd8b`` / ``aBcd16b`` in ``ONEDNN_VERBOSE``); an input or
      ``grad_output`` that is not contiguous in the backend's memory format is first copied
      (``.contiguous(memory_format)`` in ``mkldnn_convolution_backward`` and ``_convolution``).
      Measured on ``vae-small`` (AVX2, 2 threads, 4 x 64-128 channels x 128 x 128 fp32), per op
      from ``VmHWM``: a forward 64 -> 64 3 x 3 holds 16.0 MiB beyond its output (rule: 16.0), a
      128 -> 64 1 x 1 31.8 (32.0), a backward 64 -> 64 31.8 (32.0), 128 -> 64 1 x 1 47.8 (48.0),
      a channels-last 128 -> 128 33.5 (its ``grad_output`` copy, 32.0). Not modelled: the
      kernels' scratchpads (up to 0.5 MiB on these), and oneDNN's choice of another kernel for
      some shapes (a strided backward on AVX2 runs ``brgconv_strided``, which held 32.2 MiB where
      the rule says 20.3). On ``device="cuda"`` the convolutions' cuDNN workspaces are the band's
      (:mod:`memguard.estimation.cuda_rules`), not this rule's.

Known but not corrected:
    * Other buffers a CPU kernel makes and frees inside one op (GEMM packing buffers in MKL,
      which the truth's ``MKL_DISABLE_FAST_MM=1`` frees at once; a depthwise 7 x 7 backward's
      scratch). ``sd3-small`` (-3.7% against ``benchmarks/truth.py``) has no op holding over 2 MiB
      inside it (per op from ``VmHWM``), and the trace equals the live tensors of a real step at its
      peak (217.1 MiB counted tensor by tensor, the trace 218.2): the rest is the truth's. Its
      warm-up step runs at batch 1, and the first measured step at batch 4 leaves 7.9 MiB resident
      that no tensor holds, once (8.2 MiB after the second step): one-time state of the libraries
      for the new matrix shapes, not training memory. Warmed up at batch 4, that residue is 0.5 MiB
      and the peak reads 218.4-219.2 MiB, the trace within 0.5%. (The forward of its CPU attention,
      ``cpu_flash_attention`` in ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``, keeps
      ``qSplitSize x (kvSplitSize + headSize + 2)`` floats per thread, 94 KiB: not it either.)

Named in the estimate's notes (see :func:`uncounted`):
    * On a GPU, cuDNN's RNN reserve space (``_cudnn_rnn``'s ``reserve`` output, sized by
      ``cudnnGetRNNTempSpaceSizes`` inside the closed cuDNN library): the CUDA trace runs the CPU's
      kernel and counts its oneDNN workspace in its place, of the same order (gates and states of
      every time step) but not the same size.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "corrected", "mkldnn_conv_transient", "mkldnn_lstm_backward_transient", "mkldnn_lstm_forward_written",
    "mkldnn_lstm_workspace", "transient", "uncounted",
]

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


def mkldnn_lstm_forward_written(steps: int, batch: int, input_size: int, hidden: int, elem: int = 4) -> int:
    """Bytes of :func:`mkldnn_lstm_workspace` that oneDNN's ``forward_training`` writes: on the CPU,
    the workspace's resident pages from the forward to the backward.

    The workspace comes from PyTorch's allocator untouched (a fresh mapping for any workspace of
    64 KiB or more under the truth's ``MALLOC_MMAP_THRESHOLD_``), and Linux backs a page only once
    it is written. ``rnn_utils::set_offsets`` (``src/cpu/rnn/rnn_utils.cpp``, oneDNN 3.x) lays the
    parts out page-aligned in the order ``ws_gates``, ``ws_ht``, ``ws_states_layer``,
    ``ws_states_iter`` (registered twice), ``ws_states_iter_c``, then the gradients. Read from
    ``/proc/self/pagemap`` after a real ``mkldnn_rnn_layer`` (torch 2.13, its bundled oneDNN), the
    forward writes all of ``ws_gates`` (the gates of every step) and, of the states regions, only
    the second half of the fourth part (the rows of ``n_layer + 1``, one ``hidden``-wide row per
    step and batch item: the states the backward reads); ``ws_ht`` and ``ws_states_layer`` stay
    untouched, the layer's input and output being PyTorch's own tensors, and the rest only the
    backward writes (:func:`mkldnn_lstm_backward_transient`). Measured: 256 steps x 16 x 256 -> 512
    writes 40.2 MiB of 122.3 (this rule: 40.5), 64 x 16 x 512 -> 512 10.0 of 30.8 (10.2). The rule
    takes that whole half region, ``(steps + 1) x batch x good_ld``, where the forward writes
    ``steps x batch`` rows of ``hidden`` values: high by a step's rows and the padding, never low.
    """
    gates = _up(steps * batch * _good_ld(4 * hidden, 4) * 4, _PAGE)
    states = _up((steps + 1) * batch * _good_ld(max(input_size, hidden), elem) * elem, _PAGE)
    return min(gates + states, mkldnn_lstm_workspace(steps, batch, input_size, hidden, elem))


def _mkldnn_rnn_layer(args: tuple[Any, ...], out: Any, device: str) -> Any:
    """``mkldnn_rnn_layer``'s outputs with a workspace of the real size, when training an LSTM: on
    ``"cpu"`` its forward-written bytes (:func:`mkldnn_lstm_forward_written`, the pages resident
    until the backward), elsewhere the whole allocation (what a GPU's allocator would count).

    Args as in ``aten/src/ATen/native/native_functions.yaml``: ``input, weight0..3, hx_, cx_,
    reverse, batch_sizes, mode, hidden_size, num_layers, has_biases, bidirectional, batch_first,
    train``; the input comes time-major, ``(steps, batch, input_size)``, from ``mkldnn_impl``.
    """
    x, mode, hidden, train = args[0], args[9], args[10], args[15]
    output, hy, cy, workspace = out
    if not train or mode != _LSTM_MODE or workspace.numel() or x.dim() != 3:
        return out
    steps, batch, input_size = x.shape
    size = mkldnn_lstm_forward_written if device == "cpu" else mkldnn_lstm_workspace
    n = size(int(steps), int(batch), int(input_size), int(hidden), x.element_size())
    return output, hy, cy, output.new_empty((n,), dtype=torch.uint8)


_CORRECTIONS = {torch.ops.aten.mkldnn_rnn_layer.default: _mkldnn_rnn_layer}


def corrected(func: Any, args: tuple[Any, ...], out: Any, device: str) -> Any:
    """``out`` of ``func(*args)`` as the real kernel of ``device`` makes it (see the module docstring).

    Called by the trace's dispatch mode on every op, under the fake mode: a corrected output is a
    fake tensor. On ``"cuda"`` the CPU kernel's buffers stand in for the GPU's (:func:`uncounted`).
    """
    fix = _CORRECTIONS.get(func)
    return out if fix is None else fix(args, out, device)


def mkldnn_lstm_backward_transient(steps: int, batch: int, input_size: int, hidden: int, elem: int = 4) -> int:
    """Bytes oneDNN's LSTM backward of one layer holds on the CPU beyond its outputs (the gradients)
    and the forward-written workspace, until it returns.

    Measured per op (``VmHWM`` and ``VmRSS`` around one real ``mkldnn_rnn_layer_backward``, one
    thread, the truth's ``MALLOC_MMAP_THRESHOLD_=65536``), it is three parts:

    * the workspace pages only the backward writes, which stay resident until the workspace is freed
      (the op is its last use): four regions of ``steps x batch x good_ld(max(input, hidden))``
      (the states and state gradients ``ws_diff_states_*`` it carries from step to step), counted
      as ``steps + 1`` rows each and never more than the workspace's unwritten rest;
    * its scratchpad's ``scratch_gates``, the gate gradients of every step (the backward merges the
      weight-gradient GEMM over all steps: ``steps x batch x good_ld(4 hidden)`` fp32), freed at return;
    * two copies of the weights (``4 hidden x (input + hidden)``): ``onednn_rnn_layer_backward``
      (``aten/src/ATen/native/mkldnn/RNN.cpp``) hands oneDNN the weights and the weight gradients
      as plain views of ATen tensors (``itensor_view_from_dense``), and "the weight reorder (if any)
      is handed automatically inside ideep" (its ONEDNN RNN integration notes, I.b): the weights
      and their gradients in oneDNN's blocked layout, freed at return.

    Against the measured peak of the op over its inputs less its gradients (MiB): 256 steps x 16 x
    256 -> 512 77.1 (this rule 77.4), 256 x 16 x 512 -> 512 81.2 (81.4), 64 x 16 x 512 -> 512 32.5
    (32.4, the only shape below, by 0.1), 128 x 8 x 128 -> 256 10.8 (11.3). The workspace part was
    read as the resident growth left after the op (32.8 MiB for 256 x 16 x 512 -> 512: 4 x 8.25),
    the scratchpad as the rest of the peak; the sizes of the parts are oneDNN's
    (``rnn_utils::set_rnn_conf``'s ``scratch_gates_size``, ``ws_diff_states_*_size``), the split
    between workspace and scratchpad is the measurement's.
    """
    rows = _up((steps + 1) * batch * _good_ld(max(input_size, hidden), elem) * elem, _PAGE)
    rest = (mkldnn_lstm_workspace(steps, batch, input_size, hidden, elem)
            - mkldnn_lstm_forward_written(steps, batch, input_size, hidden, elem))
    scratch_gates = _up(steps * batch * _good_ld(4 * hidden, 4) * 4, _PAGE)
    weights = 4 * hidden * (input_size + hidden) * elem
    return min(4 * rows, rest) + scratch_gates + 2 * weights


def _lstm_backward_transient(args: tuple[Any, ...]) -> int:
    """:func:`mkldnn_lstm_backward_transient` of a ``mkldnn_rnn_layer_backward`` call.

    Args as in ``native_functions.yaml``: ``input, weight1..4, hx_, cx_tmp, output, hy_, cy_,
    grad_output, grad_hy, grad_cy, reverse, mode, hidden_size, num_layers, has_biases, train,
    bidirectional, batch_sizes, batch_first, workspace``.
    """
    x, mode, hidden, train = args[0], args[14], args[15], args[18]
    if not train or mode != _LSTM_MODE or x.dim() != 3:
        return 0
    steps, batch, input_size = (int(d) for d in x.shape)
    held = mkldnn_lstm_backward_transient(steps, batch, input_size, int(hidden), x.element_size())
    grad_output = args[10]
    if isinstance(grad_output, torch.Tensor) and not grad_output.is_contiguous():
        held += _dense(grad_output)  # the kernel reads a contiguous copy (measured: +8.2 MiB for 8.0)
    return held


def _channel_block() -> int:
    """oneDNN's channel block for fp32 activations on this host: 16 floats with AVX-512, else 8
    (one vector register: ``simd_w`` of ``jit_avx2_conv_kernel_f32`` / ``jit_avx512_common_conv``)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _channels_last(t: torch.Tensor) -> bool:
    """``suggest_memory_format() == ChannelsLast`` (or ``ChannelsLast3d``) for a 4-D (5-D) tensor."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def _dense(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _blocked(t: torch.Tensor | tuple[int, ...], elem: int, block: int) -> int:
    """Bytes of an activation in oneDNN's blocked layout: channels (dim 1) padded to ``block``."""
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else t
    return math.prod((shape[0], _up(shape[1], block), *shape[2:])) * elem


def mkldnn_conv_transient(input: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                          grad_output: torch.Tensor | None = None, output_mask: tuple[bool, ...] = (),
                          block: int | None = None) -> int:
    """Bytes a CPU oneDNN convolution holds inside the op beyond its outputs (see the module docstring).

    The forward (``out`` given) runs ``ideep::convolution_forward::compute`` on a blocked copy of
    the input into a blocked result ``y``, then ``mkldnn_to_dense(y)``: the phases are
    ``x_b + w_b + y_b`` and ``y_b + out``. The backward (``grad_output`` given) runs
    ``mkldnn_convolution_backward_input`` (``dy_b + w_b + dx_b``, then ``dx_b + grad_input``) and
    ``_backward_weights`` beside ``grad_input`` (``dy_b + x_b + dw_b``, then ``dw_b + grad_weight``).
    In channels-last the activations are viewed (no copies). A tensor not contiguous in the backend's
    format is first copied, the copy held through the op. Result: the largest phase minus the outputs.
    """
    block = block or _channel_block()
    elem = input.element_size()
    cl = _channels_last(input) or _channels_last(weight)
    fmt = ({4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim(), torch.contiguous_format)
           if cl else torch.contiguous_format)

    def copy(t: torch.Tensor) -> int:  # .contiguous(memory_format) of a tensor not already so
        return 0 if t.is_contiguous(memory_format=fmt) else _dense(t)

    def internal(t: torch.Tensor) -> int:  # a blocked copy, or a view of a channels-last tensor
        return 0 if cl else _blocked(t, elem, block)

    w_b = _blocked(tuple(weight.shape), elem, block) if not cl else _dense(weight)
    if grad_output is None and out is not None:
        held = copy(input)
        phases = (internal(input) + w_b + internal(out), internal(out) + _dense(out))
        return max(0, held + max(phases) - _dense(out))
    if grad_output is None:
        return 0
    held = copy(input) + copy(grad_output)
    grad_in = _dense(input) if output_mask[0] else 0
    dw = _dense(weight) if (output_mask[1] or output_mask[2]) else 0
    phases = [0]
    if grad_in:
        phases += [internal(grad_output) + w_b + internal(input), internal(input) + grad_in]
    if dw:
        phases += [grad_in + internal(grad_output) + internal(input) + w_b, grad_in + w_b + dw]
    return max(0, held + max(phases) - grad_in - dw)


def _conv_transient(func: Any, args: tuple[Any, ...], out: Any) -> int:
    """:func:`mkldnn_conv_transient` of a ``convolution`` or ``convolution_backward`` call that
    PyTorch sends to its oneDNN backend (``torch._C._select_conv_backend``), else 0."""
    forward = func is torch.ops.aten.convolution.default
    if forward:
        x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        dy, bias_sizes, mask = None, None, ()
    else:
        dy, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args[:11]
        bias = None
    if transposed or x.dim() not in (4, 5):
        return 0
    try:
        backend = torch._C._select_conv_backend(x, w, bias, stride, padding, dilation, transposed,
                                                output_padding, groups, bias_sizes)
    except (RuntimeError, TypeError):  # arguments it cannot read (symbolic sizes): count nothing
        return 0
    if backend != torch._C._ConvBackend.Mkldnn:
        return 0
    if forward:
        return mkldnn_conv_transient(x, w, out=out)
    return mkldnn_conv_transient(x, w, grad_output=dy, output_mask=tuple(mask))


_TRANSIENTS = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default,
               torch.ops.aten.mkldnn_rnn_layer_backward.default}


def transient(func: Any, args: tuple[Any, ...], out: Any, device: str) -> int:
    """Bytes the real kernel of ``func(*args)`` holds while it runs beyond ``out``, freed before it
    returns (see the module docstring), or 0. CPU only: on CUDA the convolutions' workspaces are
    the band's (:meth:`memguard.estimation.cuda_rules.Workspaces.band`)."""
    if device != "cpu" or func not in _TRANSIENTS:
        return 0
    if func is torch.ops.aten.mkldnn_rnn_layer_backward.default:
        return _lstm_backward_transient(args)
    return _conv_transient(func, args, out)


def uncounted(func: Any, device: str) -> str | None:
    """What the real kernel of ``device`` holds that the trace cannot count, in words, or ``None``."""
    if device == "cuda" and func in _CORRECTIONS:
        return "cuDNN's RNN reserve space (counted as oneDNN's CPU workspace)"
    return None
