"""What a GPU runs differently from the CPU, applied to a trace that runs on fake CPU tensors.

Fake CUDA tensors cannot run autograd on a CPU-only build of torch, so the trace computes on fake
CPU tensors and this module makes the CPU take the kernels and dtypes a GPU would where they differ
in memory: :func:`device_kernels` for the whole traced step, :func:`device_autocast` around the
forward and the loss. For ``device="cuda"``:

* **Autocast** follows CUDA's op lists. While either context is active, the ``AutocastCPU``
  dispatch key runs CUDA's policy for every op torch registers for ``AutocastCUDA``
  (``_CUDA_AUTOCAST``: the ``AT_FORALL_*`` lists of ``ATen/autocast_mode.h`` of the installed
  torch, plus the cuDNN convolutions and the ban on ``binary_cross_entropy`` of
  ``aten/src/ATen/autocast_mode.cpp``) and falls through for the ops only the CPU lists
  (``cross_entropy_loss``, ``cat``, ``stack``, pools, fft, linalg). The kernels are registered
  with ``torch.library`` and removed on exit, also when the traced code raises, which brings the
  CPU's back. The registration is global, so the recompute of checkpointed layers, which
  re-enters autocast from the state ``torch.utils.checkpoint`` saved, gets the CUDA policy too.
* **Attention**: ``F.scaled_dot_product_attention`` casts its inputs as CUDA's autocast does,
  takes the backend PyTorch would (:func:`sdpa_backend`) and calls the CUDA op, whose meta kernel
  gives CUDA's outputs (flash: an fp32 log-sum-exp per row; memory-efficient: one padded to 32);
  flash backward's own fp32 buffers are allocated too.
* **Dropout** takes the fused ``native_dropout`` kernel (a 1-byte mask).

* **Workspaces whose size the trace cannot know** are recorded while the step is traced
  (:class:`Workspaces`, yielded by :func:`device_kernels`) and stated as the estimate's band
  (:attr:`MemoryEstimate.band <memguard.estimation.result.MemoryEstimate.band>`), never in the point
  estimate: cuDNN convolution workspaces (:func:`conv_workspace_bytes`), the memory-efficient and
  cuDNN attention backward accumulators (:func:`attention_backward_bytes`) and the cuBLAS workspace
  of the autograd thread's handle (:data:`CUBLAS_WORKSPACE_BYTES`).
* **Communication** on more than one rank: NCCL's connection buffers, outside the caching allocator
  (:func:`communication_band`); DDP's buckets and FSDP's gathered units are in the point estimate.
* **bitsandbytes' optimizer kernels** add nothing: ``optimizer_update_8bit_blockwise`` and
  ``optimizer_update_32bit`` update the parameter, the states and their absmax in place
  (``bitsandbytes/functional.py``; ``Optimizer8bit.update_step`` in ``bitsandbytes/optim/optimizer.py``
  only makes a non-contiguous parameter or gradient contiguous first), their quantization maps are two
  256-entry fp32 tables shared by every parameter (``name2qmap``), and ``percentile_clipping`` (off by
  default) keeps 100 fp32 per parameter. Their state is the point estimate's
  (:class:`~memguard.estimation.optim_stand_ins.AdamW8bitStandIn`); a paged optimizer's state is in CUDA managed
  memory, counted as resident (the estimate's note says so).

Known limitations: another library's ``AutocastCUDA`` kernels (torchvision's) are not emulated. The
math fallback's dropout keeps the CPU's noise tensor. CPU autocast must be idle in other threads
during a CUDA trace (the registration is process-wide).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from memguard.errors import TraceError
from memguard.estimation.band import (
    CUBLAS_WORKSPACE_BYTES,
    NCCL_BAND_ITEM,
    communication_band,
    cublas_band,
    nccl_buffer_bytes,
)
from memguard.estimation.sdpa import DEFAULT_COMPUTE_CAPABILITY, SdpaBackend, sdpa_backend
from memguard.units import format_bytes

__all__ = ["CUBLAS_WORKSPACE_BYTES", "DEFAULT_COMPUTE_CAPABILITY", "NCCL_BAND_ITEM", "ConvCall", "Workspaces",
           "attention_backward_bytes", "communication_band", "conv_workspace_bytes", "cuda_autocast_policy",
           "device_autocast", "device_kernels", "nccl_buffer_bytes", "sdpa_backend"]


_CUDA_AUTOCAST: dict[str, tuple[str, ...]] = {
    "lower_precision_fp": ("_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
        "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm",
        "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
        "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
        "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
        "cudnn_convolution", "cudnn_convolution_transpose"),
    "fp32": ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
        "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
        "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
        "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
        "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
        "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa"),
    "fp32_set_opt_dtype": ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
        "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList"),
    "fp32_append_dtype": ("norm.Scalar", "norm.ScalarOpt_dim"),
    "promote": ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
        "tensordot", "scatter_add"),
    "banned": ("binary_cross_entropy",),
}
"""CUDA's autocast policy of each op (registration name without ``aten::``), torch 2.13."""

_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_BANNED = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast "
           "(CUDA autocast refuses them); use binary_cross_entropy_with_logits or BCEWithLogitsLoss")
_NO_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def cuda_autocast_policy() -> dict[str, str]:
    """CUDA's autocast policy by registration name (``"aten::layer_norm"`` -> ``"fp32"``) of the
    ops the installed torch registers for ``AutocastCUDA``.

    Raises:
        TraceError: when torch registers an ``aten`` op for ``AutocastCUDA`` that ``_CUDA_AUTOCAST``
            does not cover (a newer torch): the trace would silently follow the CPU's rule for it.
    """
    table = {f"aten::{name}": policy for policy, names in _CUDA_AUTOCAST.items() for name in names}
    registered = {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")
                  if n.startswith("aten::")}
    missing = sorted(registered - table.keys())
    if missing:
        raise TraceError(
            f"torch {torch.__version__} registers CUDA autocast kernels for {', '.join(missing)}, "
            "which memguard's table (_CUDA_AUTOCAST in memguard/estimation/cuda_rules.py) does not cover; "
            "add them from ATen/autocast_mode.h of this torch, or estimate with device='cpu'")
    return {name: policy for name, policy in table.items() if name in registered}


@contextlib.contextmanager
def device_autocast(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """The autocast of a mixed-precision forward on ``device`` (a no-op without mixed precision):
    CPU autocast, running CUDA's op lists for ``"cuda"`` (the tensors are CPU tensors)."""
    if dtype is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        if device == "cuda":
            stack.enter_context(_cuda_autocast_policy())
        stack.enter_context(torch.autocast("cpu", dtype=dtype))
        yield


@contextlib.contextmanager
def device_kernels(device: str, *, compute_capability: tuple[int, int] = DEFAULT_COMPUTE_CAPABILITY,
                   ) -> Iterator[Workspaces]:
    """Take the kernels ``device`` takes where the CPU's differ in memory (nothing for ``"cpu"``);
    ``compute_capability`` is the GPU generation the SDPA backend choice assumes. Yields the
    :class:`Workspaces` record of the kernels whose workspaces the trace cannot size (empty on the CPU)."""
    seen = Workspaces()
    if device != "cuda":
        yield seen
        return
    with _cuda_autocast_policy(), _cuda_kernels(compute_capability, seen):
        yield seen


# =========================================================================== workspaces (the band)


CUDNN_WGRAD_SPLITS = 640
"""The most fp32 partial weight gradients memguard assumes a cuDNN weight-gradient kernel keeps
(split-K over the batch x output positions). cuDNN does not document its engines' workspaces; this
figure is an assumption, sized on published runs where a workspace shows at the end of backward:
Raschka's ViT-L/16 at batch 16 and 4 (``benchmarks/published.py``, rows ``rb-04-b16`` and
``rb-05-accum``) reserve 1.0 and 0.7 GiB more than memguard's peak, which falls in the middle of
backward, while at batch 64 the activations hide it; 640 fp32 copies of the 1024 x 3 x 16 x 16
patch-embedding weight are 1.9 GiB. An upper end for the band, never a prediction."""


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One traced convolution: what its workspace depends on.

    Attributes:
        input: the input's shape; weight: the weight's shape; output: the output's shape.
        element_size: bytes per element of the computation (the input's dtype after autocast).
        grad_input: whether backward computes the input's gradient (data gradient).
        grad_weight: whether backward computes the weight's gradient.
    """

    input: tuple[int, ...]
    weight: tuple[int, ...]
    output: tuple[int, ...]
    element_size: int
    grad_input: bool
    grad_weight: bool


def conv_workspace_bytes(call: ConvCall) -> dict[str, int]:
    """The largest workspace each pass of ``call`` may take, by pass (``forward``, ``data gradient``,
    ``weight gradient``), as an upper end, not a prediction.

    PyTorch asks cuDNN for algorithms ranked by its heuristics when ``torch.backends.cudnn.benchmark``
    is False (``getValidAlgorithms`` over ``cudnnGetConvolution*Algorithm_v7`` in
    ``aten/src/ATen/native/cudnn/Conv_v7.cpp``; the heuristic engine configs of ``get_plans_from_find`` /
    ``generate_and_filter_plans`` in ``Conv_v8.cpp``), and, when True, times them (``cudnnFind*``) within
    a workspace limit of the largest block the caching allocator can hand out without a ``cudaMalloc``
    (``getMaxWorkspaceSize`` in ``Conv_v7.cpp``, over ``CUDACachingAllocator::cacheInfo``: the
    largest unused cached block). Either way it then
    allocates the chosen algorithm's workspace through the caching allocator, so the workspace shows in
    ``max_memory_allocated``, and when that allocation raises an out-of-memory error it takes the next
    algorithm (``try_plans`` in ``Conv_v8.cpp``, the ``OutOfMemoryError`` catch in ``Conv_v7.cpp``'s
    algorithm loop), down to ``IMPLICIT_GEMM``, which needs none. The size of each algorithm's
    workspace is cuDNN's, per GPU and version, so memguard takes:

    * forward and data gradient: the ``GEMM`` algorithm's explicit im2col matrix
      (cuDNN API reference, ``CUDNN_CONVOLUTION_FWD_ALGO_GEMM``: "explicitly forms the matrix required
      to hold the input tensor data"), ``C_in/groups x prod(kernel) x N x prod(output)`` elements;
    * weight gradient: :data:`CUDNN_WGRAD_SPLITS` fp32 partial copies of the weight, no more than one
      per output position of the batch, or the im2col matrix if larger.
    """
    n, spatial = call.output[0], math.prod(call.output[2:])
    kernel = math.prod(call.weight[1:])
    im2col = kernel * n * spatial * call.element_size
    out = {"forward": im2col}
    if call.grad_input:
        out["data gradient"] = im2col
    if call.grad_weight:
        splits = min(CUDNN_WGRAD_SPLITS, n * spatial)
        out["weight gradient"] = max(im2col, splits * math.prod(call.weight) * 4)
    return out


def attention_backward_bytes(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    """The fp32 accumulators the memory-efficient attention backward may allocate besides its outputs:
    ``grad_q`` (and ``grad_k``/``grad_v``) in fp32 when the kernel accumulates over several blocks
    (``kNeedsAccumGradQ``/``K``/``V`` and the ``workspace`` sized from them in
    ``aten/src/ATen/native/transformers/cuda/attention_backward.cu``); whether it does depends on
    the kernel chosen for the GPU and head size, so the band takes all three. cuDNN's attention
    backward (``_cudnn_attention_backward``) takes a workspace cuDNN sizes per GPU; memguard takes the
    same bound."""
    return 4 * (math.prod(q) + math.prod(k) + math.prod(v))


@dataclasses.dataclass
class Workspaces:
    """The kernels of a traced step whose workspaces only the target GPU and its libraries size.

    Attributes:
        convs: the convolutions (:class:`ConvCall`), in order.
        attention: ``(backend, q shape, k shape, v shape)`` of each fused attention whose backward
            allocates workspaces memguard cannot size (:attr:`SdpaBackend.unsized_workspace`: ``"efficient"``,
            ``"cudnn"``) and that needs a gradient.
    """

    convs: list[ConvCall] = dataclasses.field(default_factory=list)
    attention: list[tuple[SdpaBackend, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list)

    def band(self, timeline: Sequence[tuple[int, str, int]] = (), *, backward: bool = True) -> dict[str, int]:
        """The band's items for this step, ``{what: bytes above the point estimate}``.

        Workspaces live while their kernel runs, so each kind adds its largest, not the sum, and adds
        it on top of the peak, except one placed in time: the weight gradient of the forward's first
        convolution (a patch embedding, a stem) is computed by the last op of backward, when the
        activations are gone; with ``timeline`` (the trace's ``(event, phase, live bytes)``) it adds
        only what it exceeds the peak by, from the live bytes at the end of backward.
        ``backward``: whether the step runs one (the cuBLAS workspace of autograd's thread).
        """
        out: dict[str, int] = {}
        if self.convs:
            peak = max((live for _, _, live in timeline), default=0)
            ends = [live for _, phase, live in timeline if phase in ("backward", "block-backward")]
            first, rest = self.convs[0], self.convs[1:]
            passes: dict[str, int] = {}
            for call in rest:
                for what, n in conv_workspace_bytes(call).items():
                    passes[what] = max(passes.get(what, 0), n)
            first_passes = conv_workspace_bytes(first)
            wgrad = first_passes.pop("weight gradient", 0)
            for what, n in first_passes.items():
                passes[what] = max(passes.get(what, 0), n)
            above_peak = max(passes.values(), default=0)
            if wgrad:
                placed = ends[-1] + wgrad - peak if ends else wgrad
                above_peak = max(above_peak, placed)
            out[f"cudnn: convolution workspaces ({len(self.convs)} calls; the first one's weight gradient up to "
                f"{format_bytes(wgrad)} at the end of backward; size per GPU and cuDNN version)"] = max(0, above_peak)
        if self.attention:
            backends = sorted({a[0] for a in self.attention})
            out[f"attention backward workspace ({', '.join(backends)}; {len(self.attention)} calls)"] = max(
                attention_backward_bytes(q, k, v) for _, q, k, v in self.attention)
        if backward:
            out.update(cublas_band())
        return out


# =========================================================================== communication (the band)


# =========================================================================== CUDA autocast policy


class _Registration:
    """The process-wide registration of the CUDA policy on ``AutocastCPU``, counted by users."""

    lock, users = threading.Lock(), 0
    library: torch.library.Library | None = None
    clear: Callable[[], None] | None = None


_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""16-bit casts of fp32 leaves that require grad (weights), as ``at::autocast::cached_cast`` keeps
them until the outermost autocast exits (``autocast_mode.cpp``)."""


@contextlib.contextmanager
def _cuda_autocast_policy() -> Iterator[None]:
    """Register CUDA's autocast policy on the ``AutocastCPU`` key while in the context; the cast
    cache is cleared with torch's (``torch.autocast.__exit__`` calls ``torch.clear_autocast_cache``
    at nesting 0)."""
    reg = _Registration
    with reg.lock:
        if reg.users == 0:
            reg.library = _register(cuda_autocast_policy())
            native = reg.clear = torch.clear_autocast_cache
            torch.clear_autocast_cache = lambda: (native(), _CASTS.clear())[0]
        reg.users += 1
    try:
        yield
    finally:
        with reg.lock:
            reg.users -= 1
            if reg.users == 0 and reg.library is not None:
                reg.library._destroy()
                torch.clear_autocast_cache = reg.clear  # type: ignore[assignment]
                reg.library = reg.clear = None
                _CASTS.clear()


def _register(policy: dict[str, str]) -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    cpu_only = {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU")
                if n.startswith("aten::")} - policy.keys()
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel" (once)
            warnings.simplefilter("ignore")
            for name, rule in policy.items():
                lib.impl(name[6:], _kernel(_op(name[6:]), rule, name[6:]), "AutocastCPU")
            for name in sorted(cpu_only):
                lib.impl(name[6:], torch.library.fallthrough_kernel, "AutocastCPU")
    except BaseException:
        lib._destroy()
        raise
    return lib


def _op(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(t: Any) -> bool:
    """``is_eligible`` of ``autocast_mode.h`` for the CPU tensors that stand in for CUDA ones."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == "cpu")


def _cast(dtype: torch.dtype, tree: Any) -> Any:
    """``cached_cast`` of every eligible tensor in ``tree`` (``autocast_mode.cpp``)."""
    lower = torch.get_autocast_dtype("cpu")

    def one(t: torch.Tensor) -> torch.Tensor:
        if not _eligible(t) or t.dtype == dtype:
            return t
        if (dtype == lower and t.dtype == torch.float32 and t.requires_grad and t.is_leaf
                and not t._is_view() and torch.is_autocast_cache_enabled()):
            cast = _CASTS.get(t)
            if cast is None:
                cast = _CASTS[t] = t.to(dtype)
            return cast
        return t.to(dtype)

    return tree_map_only(torch.Tensor, one, tree)


def _promote_type(tree: Any) -> torch.dtype:
    """``promote_type``: fp32 when any eligible input is fp32, else the autocast dtype."""
    lower = current = torch.get_autocast_dtype("cpu")
    for t in torch.utils._pytree.tree_leaves(tree):
        if not _eligible(t):
            continue
        if current == torch.float32 or t.dtype == torch.float32:
            current = torch.float32
        elif not (current == lower and t.dtype == lower):
            raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
    return current


def _kernel(op: torch._ops.OpOverload, rule: str, name: str) -> Callable[..., Any]:
    """A Python kernel applying the ``rule`` of ``WrapFunction_`` (``autocast_mode.h``)."""
    schema = op._schema.arguments

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
            if rule == "lower_precision_fp":
                args, kwargs = _cast(torch.get_autocast_dtype("cpu"), (args, kwargs))
            elif rule == "fp32":
                args, kwargs = _cast(torch.float32, (args, kwargs))
            elif rule == "promote":
                args, kwargs = _cast(_promote_type((args, kwargs)), (args, kwargs))
            elif rule == "fp32_set_opt_dtype":
                return _set_opt_dtype(op, name, schema, args, kwargs)
            elif rule == "fp32_append_dtype":
                full = [*args, *(a.default_value for a in schema[len(args):] if not a.kwarg_only)]
                out = torch.float32 if _eligible(args[0]) else args[0].dtype
                return _op(_APPEND_DTYPE[name])(*full, dtype=out)
            else:
                raise RuntimeError(_BANNED)
            return op(*args, **kwargs)

    return kernel


def _set_opt_dtype(op: torch._ops.OpOverload, name: str, schema: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    """``fp32_set_opt_dtype``: an unset ``dtype`` becomes fp32 when the first input is eligible.

    CUDA's ``softmax``/``log_softmax`` of an fp16 input with ``dtype=float32`` take the
    ``half_to_float`` kernel and make no fp32 copy of the input (``aten/src/ATen/native/
    SoftMax.cpp``; on fake tensors); bf16 inputs are copied.
    """
    index = next(i for i, a in enumerate(schema) if a.name == "dtype")
    given = args[index] if index < len(args) else kwargs.get("dtype")
    x = args[0]
    dtype = given if given is not None or not _eligible(x) else torch.float32
    half_to_float = x.dtype == torch.float16 and dtype == torch.float32 and is_fake(x)  # CPU kernels lack it
    if name in ("softmax.int", "log_softmax.int") and half_to_float:
        inner = torch.ops.aten._softmax if name == "softmax.int" else torch.ops.aten._log_softmax
        return inner.default(x, args[1], True)
    if dtype is given:
        return op(*args, **kwargs)
    if index < len(args):
        args = (*args[:index], torch.float32, *args[index + 1:])
    else:
        kwargs = {**kwargs, "dtype": torch.float32}
    return op(*args, **kwargs)


# =========================================================================== CUDA kernels


@contextlib.contextmanager
def _cuda_kernels(capability: tuple[int, int], seen: Workspaces) -> Iterator[None]:
    """Swap ``F.scaled_dot_product_attention`` for :func:`_cuda_sdpa` and ``F.dropout`` for the fused
    ``native_dropout`` that ``aten::dropout`` takes on CUDA (a 1-byte mask; the CPU's multiplies by a
    noise tensor of the input's dtype; in-place dropout is never fused: ``is_fused_kernel_acceptable``
    in ``aten/src/ATen/native/Dropout.cpp``), for the whole trace rather than through a
    ``TorchFunctionMode``: checkpointed layers recompute their forward inside backward."""
    functional = torch.nn.functional
    sdpa, dropout = functional.scaled_dot_product_attention, functional.dropout
    convs = {name: getattr(functional, name) for name in ("conv1d", "conv2d", "conv3d")}

    def fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
        return _cuda_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          capability, seen)

    def recorded(conv: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = conv(input, weight, *args, **kwargs)
            if out.device.type != "meta":
                grad = torch.is_grad_enabled()
                seen.convs.append(ConvCall(tuple(input.shape), tuple(weight.shape), tuple(out.shape),
                                           out.element_size(), grad and input.requires_grad,
                                           grad and weight.requires_grad))
            return out
        return run

    def native_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
                       inplace: bool = False) -> torch.Tensor:
        if not training or p == 0.0 or inplace:
            return dropout(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    functional.scaled_dot_product_attention, functional.dropout = fused_sdpa, native_dropout
    for name, conv in convs.items():
        setattr(functional, name, recorded(conv))
    try:
        yield
    finally:
        functional.scaled_dot_product_attention, functional.dropout = sdpa, dropout
        for name, conv in convs.items():
            setattr(functional, name, conv)


def _cuda_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
               capability: tuple[int, int], seen: Workspaces | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` as CUDA runs it (``aten/src/ATen/native/transformers/
    attention.cpp``): CUDA autocast casts all inputs to 16 bits (``lower_precision_fp``), the
    backend is :func:`sdpa_backend`'s, a boolean mask becomes an additive one of the query's
    dtype, and memory-efficient attention pads an unaligned mask to 16 columns
    (``preprocess_mask``)."""
    if torch.is_autocast_enabled("cpu"):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
            q, k, v, mask = _cast(torch.get_autocast_dtype("cpu"), (q, k, v, mask))
    with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
        backend = sdpa_backend(q, k, v, mask, dropout_p, is_causal, enable_gqa,
                               compute_capability=capability)
        if backend is SdpaBackend.FLASH:
            return _flash(q, k, v, dropout_p, is_causal, scale)
        if mask is not None and mask.dtype != q.dtype:
            additive = torch.zeros_like(mask, dtype=q.dtype)
            mask = (additive.masked_fill_(mask.logical_not(), float("-inf"))
                    if mask.dtype == torch.bool else mask.to(q.dtype))
        lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if lse and seen is not None and backend.unsized_workspace:
            seen.attention.append((backend, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        if backend is SdpaBackend.EFFICIENT:
            if k.shape[1] != q.shape[1]:  # grouped-query: the op's meta kernels take equal heads
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            if mask is not None:
                mask = _preprocess_mask(mask, q, k)
            return _EfficientAttention.apply(q, k, v, mask, dropout_p, is_causal, scale, lse)
        if backend is SdpaBackend.CUDNN:
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, mask, lse, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def _preprocess_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    width = mask.shape[-1]
    if width % 16:
        return torch.nn.functional.pad(mask, (0, 16 - width % 16))[..., :width]
    if any(s % 16 for s in mask.stride()[:3]):
        return mask.contiguous()
    return mask


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, is_causal: bool,
           scale: float | None) -> torch.Tensor:
    """Flash attention with head dims padded to a multiple of 8 (``pad_last_dim<8>``), the scale
    taken from the unpadded size."""
    size = q.shape[-1]
    scale = scale if scale is not None else size ** -0.5
    if size % 8:
        pad = 8 - size % 8
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    out = _FlashAttention.apply(q, k, v, dropout_p, is_causal, scale)
    return out[..., :size] if size % 8 else out


class _FlashAttention(torch.autograd.Function):
    """``_scaled_dot_product_flash_attention`` and its backward, plus the fp32 buffers flash
    backward allocates besides its outputs (``mha_bwd`` in ``aten/src/ATen/native/transformers/
    cuda/flash_attn/flash_api.cpp``): ``softmax_d`` (B, H, S_q rounded to 128), the ``dq``
    accumulator (B, S_q rounded to 128, H, head dim rounded to 32, or 64 above 128) and, for
    grouped-query attention, ``dk``/``dv`` expanded to every query head."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                is_causal: bool, scale: float) -> torch.Tensor:
        out, lse, _, _, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                                False, scale=scale))
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        ctx.args = (max_q, max_k, dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        max_q, max_k, dropout_p, is_causal, scale = ctx.args
        b, h, s, d = q.shape
        rows, width = -(-s // 128) * 128, -(-d // (32 if d <= 128 else 64)) * (32 if d <= 128 else 64)
        buffers = [torch.empty((b, h, rows), dtype=torch.float32),
                   torch.empty((b, rows, h, width), dtype=torch.float32)]
        if k.shape[1] != h:
            buffers += [torch.empty((b, k.shape[2], h, d), dtype=q.dtype) for _ in range(2)]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, None, None, max_q, max_k, dropout_p, is_causal, seed,
            offset, scale=scale)
        del buffers
        return dq, dk, dv, None, None, None


class _EfficientAttention(torch.autograd.Function):
    """``_scaled_dot_product_efficient_attention`` and its backward, without keeping its philox
    seed and offset: on a GPU they are host scalars (``_efficient_attention_forward`` in
    ``aten/src/ATen/native/transformers/cuda/attention.cu``)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                dropout_p: float, is_causal: bool, scale: float | None, lse: bool) -> torch.Tensor:
        out, logsumexp, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, lse, dropout_p, is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, logsumexp)
        ctx.args = (dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias, out, lse = ctx.saved_tensors
        dropout_p, is_causal, scale = ctx.args
        seed, offset = (torch.empty((), dtype=torch.long) for _ in range(2))
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, bias, out, lse, seed, offset, dropout_p, list(ctx.needs_input_grad[:4]),
            is_causal, scale=scale)
        return (*grads, None, None, None, None)
