"""Read what a transformer is made of: blocks, widths, heads, activation, dropout, attention.

The seed formula and the refined formula need the same few numbers about a model: how many
transformer blocks it has, how wide they are, how many attention heads of what size, how wide the
MLP is and what activation it uses, the vocabulary, where dropout sits and which attention kernel
runs. :func:`inspect_architecture` reads them into an :class:`Architecture`, from the
transformers config of a model when it has one, else from the ``torch.nn.TransformerEncoderLayer``
/ ``TransformerDecoderLayer`` modules inside it. The answer is cached per module.

:func:`transformer_blocks` finds the blocks themselves (the one place that does): the formula
walks them to see which save activations, FSDP wraps them one by one
(:mod:`memguard.estimation.parallel`), the trace marks their backward.

Families (how a block is laid out, which decides what autograd saves in it):

========  ==========================================================================
gpt2      pre-LayerNorm, fused QKV projection, learned positions (GPT-2, GPT-Neo-like)
bert      post-LayerNorm, separate Q/K/V, learned positions (BERT, RoBERTa, DistilBERT)
bart      post-LayerNorm encoder-decoder, learned positions (BART, mBART, Marian)
t5        pre-RMSNorm encoder-decoder, relative position bias (T5, mT5)
whisper   pre-LayerNorm audio encoder-decoder, conv stem over log-mel frames (Whisper)
llama     pre-RMSNorm, rotary positions, gated MLP, grouped KV heads (Llama, Mistral, Qwen2)
vit       pre-LayerNorm image encoder, patches + class token (ViT, DeiT)
torch     ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` stacks
========  ==========================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

from memguard.errors import UnsupportedModelError
from memguard.estimation.families import FAMILIES, FAMILY_OF_MODEL_TYPE, Family, facts_of
from memguard.estimation.inputs import Head, model_task

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FAMILY_OF_MODEL_TYPE", "Architecture", "MoE", "block_stacks", "find_architecture", "inspect_architecture",
           "structure_generation", "transformer_blocks"]

_GATED_FF = ("gated-gelu", "gated-silu", "gated-relu")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Facts about a transformer that memory formulas need.

    Attributes:
        family: block layout, one of ``gpt2``, ``bert``, ``bart``, ``t5``, ``llama``, ``vit``,
            ``torch`` (see the module docstring).
        model_type: transformers ``model_type``, or the class name of a plain module.
        layers: transformer blocks in total (encoder + decoder).
        encoder_layers: blocks that see the input sequence (all of them for encoder-only and
            decoder-only models).
        decoder_layers: blocks of the decoder of an encoder-decoder model (with cross-attention),
            else 0.
        hidden: width of the residual stream (``d_model``).
        heads: query heads per attention.
        kv_heads: key/value heads (fewer than ``heads`` with grouped-query attention).
        head_dim: width of one head.
        ffn: inner width of the MLP.
        vocab: vocabulary size, or ``None`` (vision models, plain modules without embedding).
        gated_mlp: ``act(x W_gate) * (x W_up)`` MLP (Llama, T5 v1.1) instead of ``act(x W_1)``.
        activation: activation name as the config gives it (``gelu``, ``gelu_new``, ``silu``...).
        hidden_dropout: dropout on the residual branches (attention and MLP outputs).
        attention_dropout: dropout on the attention probabilities.
        activation_dropout: dropout inside the MLP, after the activation.
        embedding_dropout: dropout on the embeddings' output.
        attn_implementation: ``config._attn_implementation`` (``sdpa``, ``eager``,
            ``flash_attention_2``...); ``sdpa`` for plain torch modules.
        tied_embeddings: the output head shares the input embedding's weight.
        positions: ``learned``, ``rotary``, ``relative`` or ``none``.
        norm: ``layernorm`` or ``rmsnorm``.
        norm_first: pre-norm blocks (norm inside the residual branch) rather than post-norm.
        fused_qkv: one projection makes Q, K and V (GPT-2's ``c_attn``, torch's ``in_proj``).
        image_tokens: tokens per image of a vision model (patches + class token), else ``None``.
        pixels: values per image of a vision model (channels x height x width), else ``None``.
        num_labels: classes of a classification head, else ``None``.
        sliding_window: attention window of a sliding-window model, else ``None``.
        use_cache: the config returns a key/value cache from a training forward.
        head: what the output head computes (a :class:`~memguard.estimation.inputs.Head`), from the
            class name: ``causal-lm``, ``masked-lm``, ``seq2seq``, ``seq-cls``, ``image-cls``, ``base``
            (no head) or ``unknown``.
        moe: the mixture of experts in place of the MLP, or ``None`` for a dense model.
        qk_norm: an RMSNorm on the queries and on the keys after their projections (OLMoE's
            ``q_norm``/``k_norm`` over the projection, Qwen3's over each head: the same bytes).
    """

    family: str
    model_type: str
    layers: int
    encoder_layers: int
    decoder_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int | None
    gated_mlp: bool
    activation: str
    hidden_dropout: float
    attention_dropout: float
    activation_dropout: float
    embedding_dropout: float
    attn_implementation: str
    tied_embeddings: bool
    positions: str
    norm: str
    norm_first: bool
    fused_qkv: bool
    image_tokens: int | None = None
    pixels: int | None = None
    num_labels: int | None = None
    sliding_window: int | None = None
    use_cache: bool = False
    head: Head = Head.UNKNOWN
    moe: MoE | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.head, Head):  # a name: the enum's value
            object.__setattr__(self, "head", Head(self.head))

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model has a decoder with cross-attention over an encoder."""
        return self.decoder_layers > 0


@dataclasses.dataclass(frozen=True)
class MoE:
    """A mixture-of-experts layer as transformers lays it out: a top-k router over ``experts``
    gated MLPs of width ``ffn``, optionally beside always-on shared experts.

    Attributes:
        experts: routed experts per layer (``num_local_experts``, ``num_experts``, ``n_routed_experts``).
        top_k: experts each token is routed to (``num_experts_per_tok``).
        ffn: inner width of one expert (``moe_intermediate_size``, else ``intermediate_size``).
        layers: blocks whose MLP is the mixture (the others keep the dense MLP of width
            ``Architecture.ffn``: DeepSeek's first ``first_k_dense_replace``, Qwen-MoE's
            ``mlp_only_layers`` and ``decoder_sparse_step``).
        shared_ffn: inner width of the shared experts, 0 without (Qwen2-MoE's
            ``shared_expert_intermediate_size``; DeepSeek's ``n_shared_experts * moe_intermediate_size``).
        shared_gate: the shared expert's output is scaled by ``sigmoid(Linear(h, 1))`` (Qwen2-MoE).
        implementation: ``config._experts_implementation``: ``"grouped_mm"`` (transformers'
            default, ``PreTrainedModel.get_correct_experts_implementation``), ``"eager"`` (one
            loop step per expert hit) or ``"batched_mm"``.
    """

    experts: int
    top_k: int
    ffn: int
    layers: int
    shared_ffn: int = 0
    shared_gate: bool = False
    implementation: str = "grouped_mm"


def _moe(config: Any, n_layers: int) -> MoE | None:
    """The :class:`MoE` of a transformers config, ``None`` for a dense one (the fields of
    ``MixtralConfig``, ``Qwen2MoeConfig``/``Qwen3MoeConfig``, ``OlmoeConfig``, ``DeepseekV3Config``)."""
    experts = int(_get(config, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    top_k = int(_get(config, "num_experts_per_tok", "moe_top_k", default=0) or 0)
    if experts < 2 or top_k < 1:
        return None
    ffn = int(_get(config, "moe_intermediate_size", "intermediate_size"))
    dense_first = int(_get(config, "first_k_dense_replace", default=0) or 0)
    only_mlp = set(_get(config, "mlp_only_layers", default=()) or ())
    step = int(_get(config, "decoder_sparse_step", default=1) or 1)
    layers = sum(1 for i in range(n_layers)
                 if i >= dense_first and i not in only_mlp and (i + 1) % step == 0)
    shared = int(_get(config, "shared_expert_intermediate_size", default=0) or 0)
    if not shared and _get(config, "n_shared_experts"):
        shared = int(config.n_shared_experts) * ffn
    impl = str(getattr(config, "_experts_implementation", None) or "grouped_mm")
    return MoE(experts=experts, top_k=top_k, ffn=ffn, layers=layers, shared_ffn=shared,
               shared_gate=shared > 0 and hasattr(config, "shared_expert_intermediate_size"),
               implementation=impl)


_generation = 0
_hooks_installed = False


def _bump(*_: Any) -> None:
    global _generation
    _generation += 1


def structure_generation() -> int:
    """A counter that changes whenever any module registers a parameter, buffer or submodule.

    Caches keyed by a module (here and in :mod:`memguard.estimation.formula`) store the counter they were
    built at and are rebuilt when it has moved, so a model changed after it was inspected (an
    adapter added, a layer replaced) is inspected again. The counting uses torch's global
    registration hooks (``torch.nn.modules.module.register_module_*_registration_hook``), put
    in place on first use.
    """
    global _hooks_installed
    if not _hooks_installed:
        from torch.nn.modules import module as torch_module

        torch_module.register_module_parameter_registration_hook(_bump)
        torch_module.register_module_buffer_registration_hook(_bump)
        torch_module.register_module_module_registration_hook(_bump)
        _hooks_installed = True
    return _generation


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, int, Architecture | None]] = (
    weakref.WeakKeyDictionary())
"""module -> (structure generation, id of the config it was read with, architecture)."""


def find_architecture(module: nn.Module, config: Any = None) -> Architecture | None:
    """The :class:`Architecture` of ``module``, or ``None`` when it is not a known transformer.

    The answer is cached per module (see :func:`structure_generation`).

    Args:
        module: the model.
        config: its transformers config; ``module.config`` when omitted.
    """
    config = config if config is not None else getattr(module, "config", None)
    generation = structure_generation()
    try:
        cached = _CACHE.get(module)
    except TypeError:  # a module that cannot be weakly referenced: do not cache
        cached = None
    if cached is not None and cached[0] == generation and cached[1] == id(config):
        return cached[2]
    arch: Architecture | None = None
    if config is not None and hasattr(config, "model_type"):
        arch = _from_config(config, module)
    if arch is None:
        arch = _from_torch_layers(module)
    with contextlib.suppress(TypeError):
        _CACHE[module] = (generation, id(config), arch)
    return arch


def inspect_architecture(module: nn.Module, config: Any = None, *, name: str | None = None,
                         needs: str = "this estimate") -> Architecture:
    """Like :func:`find_architecture`, but raise when the model is not a transformer.

    Args:
        module: the model.
        config: its transformers config; ``module.config`` when omitted.
        name: the model's display name, for the error message.
        needs: what needs the architecture, for the error message.

    Raises:
        UnsupportedModelError: naming the model and what could not be read.
    """
    arch = find_architecture(module, config)
    if arch is None:
        label = name or type(module).__name__
        raise UnsupportedModelError(
            f"{needs} needs transformer blocks, but {label!r} has neither a transformers config "
            "with layers, heads and hidden size nor torch.nn.TransformerEncoderLayer/"
            "TransformerDecoderLayer modules; the number of blocks (R), attention heads (N) and "
            "head dimension (D) cannot be read. Use method='trace' for this model."
        )
    return arch


# --------------------------------------------------------------------------- transformers configs


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``config`` has and is not ``None``."""
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return default


def _head_kind(module: nn.Module, config: Any) -> Head:
    return model_task(module).head


def _from_config(config: Any, module: nn.Module) -> Architecture | None:
    """The architecture a transformers config describes (``None`` without widths and layers, or
    with sizes per stage, as hierarchical models such as Swin give them: not one repeated block).

    Each field is read under the several names the families give it (:func:`_get`); the MLP's
    activation and the dropouts, which families also name and apply differently, come from
    :func:`_activation` and :func:`_dropouts`.
    """
    model_type = str(getattr(config, "model_type", "") or "")
    facts = facts_of(model_type)
    hidden = _get(config, "hidden_size", "d_model", "n_embd", "dim")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads", "n_heads",
                 "encoder_attention_heads")
    n_layers = _get(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers",
                    "encoder_layers")
    if not (hidden and heads and n_layers) or any(isinstance(v, (list, tuple)) for v in (hidden, heads, n_layers)):
        return None
    hidden, heads, n_layers = int(hidden), int(heads), int(n_layers)
    family = facts.family or _guess_family(config)
    fam = FAMILIES[family]
    head_dim = int(_get(config, "head_dim", "d_kv", default=0) or hidden // heads)
    kv_heads = int(_get(config, "num_key_value_heads", default=heads) or heads)
    ffn = _get(config, "intermediate_size", "n_inner", "d_ff", "hidden_dim", "encoder_ffn_dim",
               "ffn_dim")
    ffn = int(ffn) if ffn else 4 * hidden
    activation, gated = _activation(config, fam)
    enc_layers, dec_layers = n_layers, 0
    if fam.encoder_decoder or getattr(config, "is_encoder_decoder", False):
        dec = _get(config, "num_decoder_layers", "decoder_layers", default=n_layers)
        enc_layers, dec_layers = n_layers, int(dec)
    hidden_dropout, attention_dropout, activation_dropout, embedding_dropout = _dropouts(config, fam)
    vocab = _get(config, "vocab_size")
    image_tokens = pixels = None
    if fam.head_input == "class-token" or (hasattr(config, "image_size") and hasattr(config, "patch_size")):
        image_tokens, pixels = _image_tokens(config), _pixels(config)
        vocab = None
    norm = "layernorm" if fam.norm == "layernorm" else "rmsnorm"
    positions = "rotary" if fam.rotary else "relative" if fam.position_bias else "learned"
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    window = _get(config, "sliding_window")
    if window is not None and not getattr(config, "use_sliding_window", True):
        window = None
    return Architecture(
        family=family, model_type=model_type, layers=enc_layers + dec_layers,
        encoder_layers=enc_layers, decoder_layers=dec_layers, hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, ffn=ffn,
        vocab=int(vocab) if vocab else None, gated_mlp=gated, activation=activation,
        hidden_dropout=hidden_dropout, attention_dropout=attention_dropout,
        activation_dropout=activation_dropout, embedding_dropout=embedding_dropout,
        attn_implementation=str(attn), tied_embeddings=bool(_tied(config, module)),
        positions=positions, norm=norm, norm_first=fam.norm_first, fused_qkv=facts.fused_qkv,
        image_tokens=image_tokens, pixels=pixels,
        num_labels=int(getattr(config, "num_labels", 0) or 0) or None,
        sliding_window=int(window) if window else None,
        # BART-like models turn the cache off themselves when given labels
        use_cache=bool(getattr(config, "use_cache", False)) and fam.training_cache,
        head=_head_kind(module, config),
        moe=_moe(config, n_layers),
        qk_norm=facts.qk_norm,
    )


def _activation(config: Any, fam: Family) -> tuple[str, bool]:
    """The MLP's activation and whether the MLP is gated (Llama's always; T5 v1.1's ``gated-gelu``)."""
    activation = str(_get(config, "hidden_act", "activation_function", "feed_forward_proj",
                          "activation", default="gelu"))
    gated = fam.always_gated or activation.startswith("gated-") or activation in _GATED_FF
    if activation.startswith("gated-"):
        activation = activation[len("gated-"):]
    if fam.gated_gelu_new and activation == "gelu" and gated:
        activation = "gelu_new"  # T5 v1.1 "gated-gelu" runs gelu_new
    return activation, gated


def _dropouts(config: Any, fam: Family) -> tuple[float, float, float, float]:
    """The hidden, attention, activation and embedding dropout probabilities."""
    hidden_dropout = float(_get(config, "resid_pdrop", "hidden_dropout_prob", "dropout_rate",
                                "dropout", "hidden_dropout", default=0.0))
    attention_dropout = float(_get(config, "attn_pdrop", "attention_probs_dropout_prob",
                                   "attention_dropout", default=hidden_dropout
                                   if fam.one_dropout else 0.0))
    if fam.one_dropout:
        attention_dropout = hidden_dropout  # T5 uses dropout_rate on attention weights too
    activation_dropout = float(_get(config, "activation_dropout", default=0.0))
    if fam.one_dropout:
        activation_dropout = hidden_dropout  # T5's DenseReluDense dropout after the activation
    embedding_dropout = float(_get(config, "embd_pdrop", default=hidden_dropout))
    if not fam.residual_dropout:
        hidden_dropout, embedding_dropout = 0.0, 0.0
    return hidden_dropout, attention_dropout, activation_dropout, embedding_dropout


def _guess_family(config: Any) -> str:
    """Family of an unlisted transformers model, from the shape of its config."""
    if getattr(config, "is_encoder_decoder", False):
        return "bart"
    if hasattr(config, "num_key_value_heads") or hasattr(config, "rms_norm_eps"):
        return "llama"
    if hasattr(config, "image_size") and hasattr(config, "patch_size"):
        return "vit"
    if getattr(config, "is_decoder", False) or hasattr(config, "n_embd"):
        return "gpt2"
    return "bert"


def _image_tokens(config: Any) -> int:
    """Patches of one image plus the class token (ViT: ``(224 / 16)**2 + 1 = 197``)."""
    size = config.image_size
    patch = config.patch_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return (h // ph) * (w // pw) + 1


def _pixels(config: Any) -> int:
    """Values of one image: ``num_channels x image_size``, as :func:`memguard.estimation.inputs.make_batch`
    builds it."""
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(config, "num_channels", 3)) * h * w


def _tied(config: Any, module: nn.Module) -> bool:
    """Whether the output head shares the input embedding's weight, read from the module."""
    get_in = getattr(module, "get_input_embeddings", None)
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        try:
            emb, out = get_in(), get_out()
        except (AttributeError, NotImplementedError):
            emb, out = None, None
        if emb is not None and out is not None:
            return getattr(emb, "weight", None) is getattr(out, "weight", None)
    return bool(getattr(config, "tie_word_embeddings", False))


# --------------------------------------------------------------------------- plain torch modules


def _from_torch_layers(module: nn.Module) -> Architecture | None:
    from torch import nn

    enc = [m for m in module.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    dec = [m for m in module.modules() if isinstance(m, nn.TransformerDecoderLayer)]
    if not enc and not dec:
        return None
    first = (enc or dec)[0]
    attn: nn.MultiheadAttention = first.self_attn
    hidden, heads = int(attn.embed_dim), int(attn.num_heads)
    act = getattr(first, "activation", None)
    act_name = getattr(act, "__name__", type(act).__name__).lower()
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    vocab = max((e.num_embeddings for e in embeddings), default=0) or None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    head_linear = linears[-1] if linears else None
    tied = bool(embeddings and head_linear is not None
                and any(head_linear.weight is e.weight for e in embeddings))
    if head_linear is not None and vocab and head_linear.out_features == vocab:
        head = Head.CAUSAL_LM
    elif head_linear is not None and head_linear.out_features != hidden:
        head = Head.SEQ_CLS
    else:
        head = Head.UNKNOWN
    return Architecture(
        family="torch", model_type=type(module).__name__, layers=len(enc) + len(dec),
        encoder_layers=len(enc), decoder_layers=len(dec), hidden=hidden, heads=heads,
        kv_heads=heads, head_dim=hidden // heads, ffn=int(first.linear1.out_features),
        vocab=vocab, gated_mlp=False, activation=act_name or "relu",
        hidden_dropout=float(first.dropout1.p), attention_dropout=float(attn.dropout),
        activation_dropout=float(first.dropout.p), embedding_dropout=0.0,
        attn_implementation="sdpa", tied_embeddings=tied, positions="none",
        norm="layernorm", norm_first=bool(getattr(first, "norm_first", False)), fused_qkv=True,
        num_labels=head_linear.out_features if head is Head.SEQ_CLS and head_linear else None,
        use_cache=False, head=head,
    )


# --------------------------------------------------------------------------- the blocks themselves


def block_stacks(module: nn.Module, config: Any = None, *, arch: Architecture | None = None,
                 guess: bool = True) -> tuple[list[nn.Module], list[nn.Module]]:
    """The repeated transformer blocks of ``module``: ``(encoder, decoder)``.

    The encoder's are those of an encoder-only or decoder-only model too; the decoder's are the
    blocks with cross-attention of an encoder-decoder model (T5, BART), else ``[]``.

    * plain torch models (family ``torch``): their ``TransformerEncoderLayer`` and
      ``TransformerDecoderLayer`` modules;
    * transformers models: the outermost ``nn.ModuleList``s whose lengths are the architecture's
      block counts, in registration order (the encoder's before the decoder's); lists nested in a
      block found already (T5's ``block[i].layer``) are skipped;
    * otherwise (no known architecture, or no list of its lengths), with ``guess``: the items of the
      ``nn.ModuleList`` holding the most parameters, e.g. a LightningModule around a transformers
      model. What FSDP's ``auto_wrap_policy`` over the block class wraps is the same list.

    Args:
        module: the model.
        config: its transformers config; ``module.config`` when omitted.
        arch: its architecture, when the caller has it (else :func:`find_architecture`).
        guess: fall back on the largest ``nn.ModuleList``. Without it, blocks are only those the
            architecture lays out, each run once (ALBERT's 12 layers share one module: no guess).
    """
    from torch import nn

    arch = arch if arch is not None else find_architecture(module, config)
    enc: list[nn.Module] = []
    dec: list[nn.Module] = []
    if arch is not None and arch.family == "torch":
        enc = [m for m in module.modules() if isinstance(m, nn.TransformerEncoderLayer)]
        dec = [m for m in module.modules() if isinstance(m, nn.TransformerDecoderLayer)]
    elif arch is not None:
        wanted = [arch.encoder_layers, arch.decoder_layers] if arch.decoder_layers else [arch.layers]
        found: list[tuple[str, nn.ModuleList]] = []
        for name, m in module.named_modules():
            if not isinstance(m, nn.ModuleList) or len(found) == len(wanted):
                continue
            if any(name.startswith(prefix + ".") for prefix, _ in found):
                continue  # inside a block already found
            if len(m) == wanted[len(found)]:
                found.append((name, m))
        enc = list(found[0][1]) if found else []
        dec = list(found[1][1]) if len(found) > 1 else []
    if guess and not (enc or dec):
        largest = max((m for m in module.modules() if isinstance(m, nn.ModuleList)), key=_numel, default=None)
        enc = list(largest) if largest is not None else []
    return enc, dec


def transformer_blocks(module: nn.Module, config: Any = None) -> list[nn.Module]:
    """Every repeated transformer block of ``module``, the encoder's first (see :func:`block_stacks`).

    ``[]`` for a model without a list of layers.
    """
    enc, dec = block_stacks(module, config)
    return enc + dec


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
