"""Published GPU measurements of training-step memory, and memguard's error on each.

No GPU is lent to this project, so the only GPU truth within reach is what others have published.
Each :class:`Row` below is one published figure, quoted as its source prints it, with every
setting the source states (model, batch, sequence, precision, optimizer, checkpointing, strategy,
LoRA), what was measured, the GPU and where it is published. For each complete row the script
runs ``memguard.estimate(..., method=m, device="cuda")`` for the trace and the formula and
compares the quantity the source measured:

* ``torch.cuda.max_memory_allocated()`` against ``estimate.peak_bytes``;
* ``torch.cuda.max_memory_reserved()`` against ``estimate.reserved_bytes`` (when memguard has it);
* NVML / ``nvidia-smi`` "used" memory against ``estimate.total_bytes`` (memguard's context and
  workspaces included). Where the source measured its own CUDA context, a second error replaces
  memguard's assumed context by that figure: ``reserved_bytes + source context``.

error = (prediction - measured) / measured; negative means memguard predicts too little.

Rows whose settings the source leaves open are kept, marked "settings incomplete", and get no
prediction. Nothing is downloaded: models are built on the meta device from configs written out
below (the figures of the original checkpoints), so the trace allocates nothing.

Usage (from the repository root)::

    python benchmarks/published.py                         # table; about 2 minutes on 2 cores
    python benchmarks/published.py --json benchmarks/results/published_gpu.json
    python benchmarks/published.py --rows hf-bs4,lt-ddp --methods formula
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, median, render_table, write_json

METHODS = ("trace", "formula")
TRACE_TIMEOUT_S = 90.0
MiB = 2**20
MB = 10**6

# What the source measured -> the MemoryEstimate attribute that predicts it.
QUANTITY = {
    "max_memory_allocated": "peak_bytes",
    "max_memory_reserved": "reserved_bytes",
    "nvml_used": "total_bytes",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One published measurement.

    Attributes:
        key: short id (``--rows``).
        source: who published it, and where (document, table or section).
        url: address of the page, file or commit holding the figure.
        gpu: the GPU the source names.
        settings: every training setting the source states, in words.
        measured: ``"max_memory_allocated"``, ``"max_memory_reserved"`` or ``"nvml_used"``.
        quoted: the figure exactly as the source prints it.
        value: the number in ``quoted``; ``unit`` its bytes (``MiB`` or ``MB``).
        estimate: builds ``(model, kwargs)`` for ``memguard.estimate``; ``None`` for rows
            without a prediction.
        context_mib: CUDA context (and kernels) the source itself measured, in MiB, if any.
        incomplete: why the settings are incomplete (no prediction, no error), else ``None``.
        differences: what the source ran that the prediction does not model, known beforehand.
        secondary: a second statistic of the same run, ``(measured, quoted, value)`` in ``unit``.
    """

    key: str
    source: str
    url: str
    gpu: str
    settings: Mapping[str, str]
    measured: str
    quoted: str
    value: float
    unit: int
    estimate: Callable[[], tuple[Any, dict[str, Any]]] | None = None
    context_mib: int | None = None
    incomplete: str | None = None
    differences: str = ""
    secondary: tuple[str, str, float] | None = None

    @property
    def measured_bytes(self) -> int:
        return round(self.value * self.unit)


# --------------------------------------------------------------------------- models and optimizers


def _bert_large_classifier() -> Any:
    """``bert-large-uncased`` with a 2-label classification head (``AutoModelForSequenceClassification``
    default), eager attention: the docs' run (January 2022, transformers 4.1x) predates SDPA in BERT."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
        architectures=["BertForSequenceClassification"])
    config._attn_implementation = "eager"
    return config


def _single_tensor(name: str, build: Callable[..., Any], state_tensors: int, factored: bool = False) -> Any:
    """An optimizer that updates one parameter at a time, as transformers' own ``AdamW`` and
    ``Adafactor`` (the Trainer's default ``adamw_hf`` in 2022, and ``optim="adafactor"``) did:
    temporaries of one parameter, not of all (torch's ``foreach`` default on CUDA)."""
    from memguard.estimation.spec import OptimizerSpec

    return OptimizerSpec(name, lambda params, **_: build(params), state_tensors, factored=factored)


def _adamw_hf() -> Any:
    import torch

    return _single_tensor("adamw-hf", lambda p: torch.optim.AdamW(p, lr=5e-5, foreach=False), 2)


def _adafactor_hf() -> Any:
    import torch

    return _single_tensor("adafactor-hf", lambda p: torch.optim.Adafactor(p, lr=5e-5, foreach=False), 0,
                          factored=True)


def _hf_docs(batch: int, *, accumulate: int = 1, ckpt: bool = False, precision: str = "32-true",
             optimizer: str = "adamw-hf") -> Callable[[], tuple[Any, dict[str, Any]]]:
    def build() -> tuple[Any, dict[str, Any]]:
        opt = {"adamw-hf": _adamw_hf, "adafactor-hf": _adafactor_hf}.get(optimizer)
        return _bert_large_classifier(), {
            "batch_size": batch, "seq_len": 512, "precision": precision,
            "optimizer": opt() if opt else optimizer, "gradient_checkpointing": ckpt,
            "accumulate_grad_batches": accumulate,
            # Trainer called model.zero_grad(); torch 1.10 kept zeroed gradients (set_to_none=False).
            "set_to_none": False,
        }
    return build


def _lightning_transformer() -> Any:
    """The Lightning FSDP guide's model: ``lightning.pytorch.demos.Transformer(vocab_size=33278,
    nlayers=32, nhid=4096, ninp=1024, nhead=64)``, about 1.01B parameters (33278 is WikiText2's
    vocabulary, the demo's default)."""
    import torch
    from lightning.pytorch.demos import Transformer

    with torch.device("meta"):
        return Transformer(vocab_size=33278, nlayers=32, nhid=4096, ninp=1024, nhead=64)


def _lightning(strategy: str, loop: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
    def build() -> tuple[Any, dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        def nll(output: torch.Tensor, batch: Any) -> torch.Tensor:
            return F.nll_loss(output, batch[1].view(-1))

        block = torch.zeros(1, 35, dtype=torch.long)  # WikiText2(block_size=35), DataLoader batch 1
        return _lightning_transformer(), {
            "example_input": (block, block.clone()), "loss_fn": nll, "optimizer": "adam",
            "precision": "32-true", "strategy": strategy, "world_size": 2, "training_loop": loop,
        }
    return build


def _optimum(model: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
    def build() -> tuple[Any, dict[str, Any]]:
        common = {"precision": "32-true", "optimizer": "adamw", "batch_size": 2}
        if model != "roberta-mc":
            return model, {**common, "seq_len": 16 if model == "gpt2" else None}
        import torch
        import transformers

        config = transformers.RobertaConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
            layer_norm_eps=1e-5, architectures=["RobertaForMultipleChoice"])
        batch = {"input_ids": torch.ones(2, 1, 16, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
        return config, {**common, "example_input": batch}
    return build


def _litgpt(model: str, quantization: str | None) -> Callable[[], tuple[Any, dict[str, Any]]]:
    """LitGPT's ``finetune/lora.py`` on Alpaca (resource tables): micro-batch 1 of the longest sample
    (1304 Llama 2 tokens), ``bf16-true``, AdamW, no checkpointing, LoRA r=8 on queries and values, and
    with ``--quantize bnb.nf4[-dq]`` Lightning's ``BitsandbytesPrecision``, which quantizes every
    ``nn.Linear``, the LM head included (``skip_modules=[]``)."""
    def build() -> tuple[Any, dict[str, Any]]:
        kwargs: dict[str, Any] = {"batch_size": 1, "seq_len": 1304, "precision": "bf16-true", "optimizer": "adamw",
                                  "gradient_checkpointing": False, "lora_rank": 8}
        if quantization:
            kind, _, dq = quantization.partition("-")
            kwargs.update(quantization=kind, double_quant=dq == "dq", skip_modules=[])
        return model, kwargs
    return build


_LG = "LitGPT tutorials/resource-tables.md (commit 8641822, 10/20/2023), 'Finetuning with LoRA on 1 GPU'"
_LG_URL = ("https://github.com/Lightning-AI/litgpt/blob/4839345a97a0a90bc5f2361664b04d665c9a0e89/"
           "tutorials/resource-tables.md")
_LG_DIFF = ("LitGPT's own GPT (one fused QKV linear carrying the LoRA of q and v), lora_dropout 0.05 (a mask and a "
            "dropped copy per adapter input); bitsandbytes 0.41.1, whose MatMul4Bit kept its input for backward "
            "(ctx.tensors = (A, B)), which 0.50, modelled here, no longer does; the peak is taken at the longest "
            "sample")


def _lg_row(key: str, model: str, quantization: str | None, quoted_gb: str) -> Row:
    settings = {"model": f"{model} (LitGPT checkpoint)", "batch": "1 (micro-batch; 128 per optimizer step)",
                "seq": "1304 (longest Alpaca sample)", "precision": "bf16-true", "optimizer": "AdamW",
                "grad_ckpt": "no", "strategy": "single GPU, Fabric",
                "lora": f"r=8 on query and value{', base ' + quantization if quantization else ''}"}
    return Row(key, _LG, _LG_URL, "A100-SXM4-40GB", settings, "max_memory_allocated",
               f"Max GPU RAM {quoted_gb} GB", float(quoted_gb), MB * 1000,
               _litgpt(model, quantization), differences=_LG_DIFF)


# --------------------------------------------------------------------------- the rows

_HF = ("Hugging Face transformers docs v4.21, 'Efficient Training on a Single GPU' (same figures in "
       "docs/source/zh/perf_train_gpu_one.md)")
_HF_URL = "https://huggingface.co/docs/transformers/v4.21.0/perf_train_gpu_one"
_HF_GPU = "Tesla V100-SXM2 16 GB (nvidia-smi: 16160 MiB; driver 460.91.03, CUDA 11.2)"
_HF_DIFF = ("run in January 2022 (nvidia-smi date; transformers 4.1x, torch 1.10 era): eager attention, "
            "transformers' per-parameter AdamW/Adafactor, model.zero_grad() keeping gradients; NVML 'used' "
            "of the whole device read after trainer.train(), so the caching allocator's pool (never emptied) and the "
            "1343 MiB context+kernels the page measured are in it")


def _hf_settings(batch: str, precision: str, optimizer: str, ckpt: str) -> dict[str, str]:
    return {"model": "bert-large-uncased, AutoModelForSequenceClassification (2 labels)",
            "batch": batch, "seq": "512 (random token ids)", "precision": precision,
            "optimizer": optimizer, "grad_ckpt": ckpt, "strategy": "single GPU, HF Trainer",
            "lora": "no"}


def _hf_row(key: str, quoted_mb: int, settings: dict[str, str], build: Callable[[], Any],
            extra: str = "") -> Row:
    return Row(key, _HF, _HF_URL, _HF_GPU, settings, "nvml_used", f"GPU memory occupied: {quoted_mb} MB.",
               quoted_mb, MiB, build, context_mib=1343, differences=_HF_DIFF + extra)


_LT = ("Lightning docs 2.1, 'Train models with billions of parameters using FSDP' (Trainer), "
       "tables 'Numbers were produced with A100 40GB GPUs, Lightning 2.1 and PyTorch 2.1'")
_LT_URL = ("https://github.com/Lightning-AI/pytorch-lightning/blob/master/"
           "docs/source-pytorch/advanced/model_parallel/fsdp.rst")
_LF = ("Lightning docs 2.1, 'Training models with billions of parameters' (Fabric), "
       "tables 'Numbers were produced with A100 40GB GPUs, Lightning 2.1 and PyTorch 2.1'")
_LF_URL = ("https://github.com/Lightning-AI/pytorch-lightning/blob/master/"
           "docs/source-fabric/advanced/model_parallel/fsdp.rst")
_L_DIFF = ("'Memory (MB)' is the peak printed by torch.cuda.memory_summary() (MiB), which the guide "
           "calls allocated memory; FSDP1 with auto_wrap_policy={TransformerEncoderLayer, "
           "TransformerDecoderLayer}")


def _l_settings(strategy: str, loop: str) -> dict[str, str]:
    return {"model": "lightning.pytorch.demos.Transformer(nlayers=32, nhid=4096, ninp=1024, nhead=64), ~1.01B",
            "batch": "1 (DataLoader default)", "seq": "35 (WikiText2 block_size)", "precision": "32-true",
            "optimizer": "torch.optim.Adam(lr=0.1)", "grad_ckpt": "no",
            "strategy": f"{strategy}, 2 GPUs, {loop}", "lora": "no"}


def _l_row(key: str, doc: str, quoted: str, strategy_words: str, strategy: str) -> Row:
    trainer = doc == "trainer"
    loop = "Lightning Trainer" if trainer else "Fabric loop (backward, step, zero_grad)"
    return Row(key, _LT if trainer else _LF, _LT_URL if trainer else _LF_URL, "A100 40GB (x2)",
               _l_settings(strategy_words, loop), "max_memory_allocated", f"Memory (MB): {quoted}",
               float(quoted.replace("'", "").replace("’", "")), MiB,
               _lightning(strategy, "lightning" if trainer else "pytorch"), differences=_L_DIFF)


_OB = ("Hugging Face optimum-benchmark CI results, dataset optimum-benchmark/rocm, "
       "benchmark_report.json 'overall' memory (unit MB = 1e6 bytes)")
_OB_GPU = "AMD Instinct, ROCm (model not named in the report; 68702.7 MB visible VRAM)"
_OB_DIFF = ("max over 5 Trainer steps after empty_cache()+reset_peak_memory_stats(), weights included; "
            "transformers 4.x of 2024 (GPT-2 then kept a 1 MiB causal-mask buffer per block, gone in 5.x); "
            "ROCm build: its BLAS workspace is not cuBLAS's")


def _ob_row(key: str, model: str, settings_model: str, commit: str, allocated: float, reserved: float) -> Row:
    settings = {"model": settings_model, "batch": "2", "seq": "16" if "vit" not in key else "224x224 image",
                "precision": "32-true (no autocast)", "optimizer": "Trainer default AdamW (adamw_torch)",
                "grad_ckpt": "no", "strategy": "single GPU, HF Trainer, 5 steps", "lora": "no"}
    return Row(key, _OB, f"https://huggingface.co/datasets/optimum-benchmark/rocm/commit/{commit}", _OB_GPU,
               settings, "max_memory_allocated", f'"max_allocated": {allocated}', allocated, MB, _optimum(model),
               differences=_OB_DIFF,
               secondary=("max_memory_reserved", f'"max_reserved": {reserved}', reserved))


_OB_COMMITS = {"gpt2": "e7e2da0fe8b0a9ab3d58a5bea2353dc942d20b5e",
               "roberta": "c66307f0071cfa7476f8906d4d3906887d4044aa",
               "vit": "f936f191d46a5cbc28cdbde30b81fb79e69ceabe"}

ROWS: tuple[Row, ...] = (
    _hf_row("hf-bs4", 14949, _hf_settings("4", "fp32", "AdamW (Trainer default adamw_hf)", "no"), _hf_docs(4)),
    _hf_row("hf-ga4", 8681, _hf_settings("1 x 4 accumulation", "fp32", "AdamW (adamw_hf)", "no"),
            _hf_docs(1, accumulate=4)),
    _hf_row("hf-ga4-ckpt", 6775, _hf_settings("1 x 4 accumulation", "fp32", "AdamW (adamw_hf)", "yes"),
            _hf_docs(1, accumulate=4, ckpt=True)),
    _hf_row("hf-fp16", 13939, _hf_settings("4", "fp16 AMP (16-mixed)", "AdamW (adamw_hf)", "no"),
            _hf_docs(4, precision="16-mixed")),
    _hf_row("hf-ga4-ckpt-fp16", 7275, _hf_settings("1 x 4 accumulation", "fp16 AMP", "AdamW (adamw_hf)", "yes"),
            _hf_docs(1, accumulate=4, ckpt=True, precision="16-mixed")),
    _hf_row("hf-adafactor", 12295, _hf_settings("4", "fp32", "Adafactor (optim='adafactor')", "no"),
            _hf_docs(4, optimizer="adafactor-hf")),
    _hf_row("hf-ga4-ckpt-fp16-adafactor", 4847,
            _hf_settings("1 x 4 accumulation", "fp16 AMP", "Adafactor", "yes"),
            _hf_docs(1, accumulate=4, ckpt=True, precision="16-mixed", optimizer="adafactor-hf")),
    _hf_row("hf-adam8bit", 13085, _hf_settings("4", "fp32", "bitsandbytes Adam8bit", "no"),
            _hf_docs(4, optimizer="adamw-8bit"), "; bnb Adam8bit modelled by memguard's AdamW8bit stand-in"),
    _hf_row("hf-ga4-ckpt-fp16-adam8bit", 5363,
            _hf_settings("1 x 4 accumulation", "fp16 AMP", "bitsandbytes Adam8bit", "yes"),
            _hf_docs(1, accumulate=4, ckpt=True, precision="16-mixed", optimizer="adamw-8bit"),
            "; bnb Adam8bit modelled by memguard's AdamW8bit stand-in"),
    _l_row("lt-ddp", "trainer", "23’125", "DDP", "ddp"),
    _l_row("lt-shard-grad-op", "trainer", "11’772", "FSDP SHARD_GRAD_OP", "fsdp_shard_grad_op"),
    _l_row("lt-full-shard", "trainer", "9’627", "FSDP FULL_SHARD", "fsdp"),
    _l_row("lt-full-shard-offload", "trainer", "2’790", "FSDP FULL_SHARD + cpu_offload=True",
           "fsdp_cpu_offload"),
    _l_row("lf-ddp", "fabric", "26’953", "DDP", "ddp"),
    _l_row("lf-shard-grad-op", "fabric", "11’815", "FSDP SHARD_GRAD_OP", "fsdp_shard_grad_op"),
    _l_row("lf-full-shard", "fabric", "11’578", "FSDP FULL_SHARD", "fsdp"),
    _l_row("lf-full-shard-offload", "fabric", "2’825", "FSDP FULL_SHARD + cpu_offload=True",
           "fsdp_cpu_offload"),
    _ob_row("ob-gpt2", "gpt2", "openai-community/gpt2 (GPT2LMHeadModel, random weights)", _OB_COMMITS["gpt2"],
            2506.73664, 2894.06976),
    _ob_row("ob-roberta-mc", "roberta-mc", "FacebookAI/roberta-base, RobertaForMultipleChoice (1 choice)",
            _OB_COMMITS["roberta"], 2497.88416, 2707.423232),
    _ob_row("ob-vit", "vit-base", "google/vit-base-patch16-224, ViTForImageClassification (1000 labels)",
            _OB_COMMITS["vit"], 1738.272256, 1935.671296),
    Row("tt-lora-1x4090", "torchtune README (commit 0217d44, May 2024), 'peak memory usage and training speed'",
        "https://github.com/pytorch/torchtune/blob/0217d44c2e1e372b34628767745c1f6538086a81/README.md",
        "RTX 4090 24 GB", {"model": "Llama2-7B (torchtune's own implementation)", "batch": "4", "seq": "2048",
                           "precision": "bf16 (config dtype)", "optimizer": "AdamW",
                           "grad_ckpt": "yes in config 7B_lora_single_device.yaml",
                           "strategy": "single GPU", "lora": "r=8 on q_proj, v_proj (config)"},
        "unknown", "Peak Memory per GPU (GB): 21.3 GB", 21.3, 10**9,
        incomplete=("the statistic (allocated, active or reserved) and how 2048-token sequences were made "
                    "from Alpaca are not stated; the config's defaults (batch 2, accumulation 64) differ "
                    "from the row")),
    _lg_row("lg-7b-lora", "llama-2-7b", None, "21.30"),
    _lg_row("lg-7b-nf4", "llama-2-7b", "nf4", "14.14"),
    _lg_row("lg-7b-nf4-dq", "llama-2-7b", "nf4-dq", "13.84"),
    _lg_row("lg-13b-nf4-dq", "llama-2-13b", "nf4-dq", "22.55"),
    Row("qlora-65b-48gb", "Dettmers et al. 2023, QLoRA, abstract and section 1",
        "https://arxiv.org/abs/2305.14314", "one 48 GB GPU",
        {"model": "LLaMA 65B (Guanaco)", "batch": "not stated for this claim", "seq": "not stated",
         "precision": "bf16 compute", "optimizer": "paged AdamW", "grad_ckpt": "yes",
         "strategy": "single GPU", "lora": "every linear layer, NF4 + double quantization"},
        "unknown", "finetune a 65B parameter model on a single 48GB GPU", 48, 10**9,
        incomplete="a bound, not a measurement: batch, sequence and the statistic are not given"),
    Row("peft-t0-3b-lora", "PEFT README, 'High performance on consumer hardware'",
        "https://github.com/huggingface/peft/blob/main/README.md", "A100 80 GB",
        {"model": "bigscience/T0_3B", "batch": "not stated", "seq": "not stated (twitter_complaints)",
         "precision": "not stated", "optimizer": "not stated", "grad_ckpt": "not stated",
         "strategy": "single GPU, plain PyTorch", "lora": "PEFT-LoRA (rank not stated)"},
        "unknown", "14.4GB GPU / 2.96GB CPU", 14.4, 10**9,
        incomplete="batch size, sequence lengths, precision, LoRA rank and the statistic are not given"),
)


# --------------------------------------------------------------------------- rows of 2023 and later (issue 17)
#
# Sources none of the rows above use, each with every setting it states and the statistic its script
# prints. Models are written out as transformers configs of the same shapes as the source's own
# implementation (timm, torchvision, LitGPT), whose differences each row names.


def _vit(hidden: int, layers: int, heads: int, mlp: int, patch: int, labels: int) -> Any:
    import transformers

    return transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=mlp, patch_size=patch, image_size=224, num_labels=labels,
                                  layer_norm_eps=1e-6, architectures=["ViTForImageClassification"])


def _llama(hidden: int, layers: int, heads: int, kv: int, mlp: int, vocab: int, *, tied: bool = False,
           theta: float = 10000.0, positions: int = 4096) -> Any:
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, intermediate_size=mlp, vocab_size=vocab,
                                    tie_word_embeddings=tied, rope_theta=theta, max_position_embeddings=positions,
                                    architectures=["LlamaForCausalLM"])


def _build(model: Callable[[], Any] | str, **kwargs: Any) -> Callable[[], tuple[Any, dict[str, Any]]]:
    def build() -> tuple[Any, dict[str, Any]]:
        kw = dict(kwargs)
        if kw.get("optimizer") == "adamw-fused":
            kw["optimizer"] = _fused_adamw()
        return (model if isinstance(model, str) else model()), kw
    return build


def _fused_adamw() -> Any:
    """``torch.optim.AdamW(fused=True)``: one kernel per group, none of ``foreach``'s temporaries."""
    import torch

    from memguard.estimation.spec import OptimizerSpec

    return OptimizerSpec("adamw-fused", lambda params, **_: torch.optim.AdamW(params, fused=True), 2)


def _vith() -> Any:
    """timm's ``vit_huge_patch14_224.orig_in21k`` with a 45-class head (resisc45): 32 blocks of width
    1280, 16 heads, MLP 5120, patch 14, class token; 630M parameters."""
    return _vit(1280, 32, 16, 5120, 14, 45)


def _vitl() -> Any:
    """torchvision's ``vit_l_16`` with ``heads.head`` replaced by a 10-class linear layer (CIFAR-10)."""
    return _vit(1024, 24, 16, 4096, 16, 10)


_AO = ("torchao, torchao/optim/README.md, 'Benchmarks' (ViT-H on resisc45: PyTorch 2.4, BF16 AMP, compiled "
       "model, batch size 8, 4070Ti SUPER)")
_AO_URL = "https://github.com/pytorch/ao/blob/072500abcfbdec15a429eb53160c63fb92534b85/torchao/optim/README.md"
_AOP = ("torchao, torchao/prototype/low_bit_optim/README.md (2024), 'Benchmarks' (ViT-H, BF16 AMP, 2 epochs, "
        "batch size 8, 4070Ti SUPER)")
_AOP_URL = ("https://github.com/pytorch/ao/blob/03cf0adec63fdbae2fd6d2aa7688b52ee8c64004/"
            "torchao/prototype/low_bit_optim/README.md")
_AOP_RUN = ("the prototype README's table was written by pytorch/ao commit 56d46a286 (2024-07-07, #481), whose "
            "benchmarks/benchmark_low_bit_adam.py mapped 'Adam' to torch.optim.Adam (foreach on CUDA), "
            "'Adam8bitBnb' to bnb.optim.Adam8bit and 'Adam8bitAo' to torchao's Adam8bit; fused AdamW came with "
            "commit 1b1e94c5b (2024-08-06), after it; ")
_AO_DIFF = ("benchmarks/benchmark_low_bit_adam.py prints torch.cuda.max_memory_allocated() / 1e9 after the run "
            "(evaluation at batch 8 under no_grad included, below the training peak); timm's ViT (fused qkv, "
            "F.sdpa) modelled by transformers' ViT of the same shapes; bitsandbytes/torchao 8-bit AdamW by "
            "memguard's 8-bit stand-in")


def _ao_row(key: str, source: str, url: str, optim_words: str, optimizer: str, quoted: str, compiled: bool) -> Row:
    settings = {"model": "timm vit_huge_patch14_224.orig_in21k, 45 classes (630M)", "batch": "8",
                "seq": "224x224 image (RandomResizedCrop)", "precision": "bf16 AMP (bf16-mixed)",
                "optimizer": optim_words, "grad_ckpt": "no",
                "strategy": f"single GPU, plain PyTorch{', model.compile(fullgraph=True)' if compiled else ''}",
                "lora": "no"}
    diff = (_AO_DIFF + "; torch.compile fuses elementwise ops, which memguard traces eager" if compiled
            else _AOP_RUN + _AO_DIFF)
    return Row(key, source, url, "RTX 4070 Ti SUPER 16 GB", settings, "max_memory_allocated",
               f"{quoted} GB", float(quoted), 10**9,
               _build(_vith, batch_size=8, precision="bf16-mixed", optimizer=optimizer), differences=diff)


_RB = ("Raschka, 'Optimizing Memory Usage for Training LLMs and Vision Transformers in PyTorch' (July 2023), "
       "code and logs: rasbt/pytorch-memory-optim logs.md")
_RB_URL = "https://github.com/rasbt/pytorch-memory-optim/blob/2d1ae1e747fe72c7bb74a2a464fe79baa23f174b/logs.md"
_RB_DIFF = ("the scripts print torch.cuda.max_memory_reserved() / 1e9 after one epoch (evaluation included); "
            "torch 2.1.0.dev20230623+cu118, Lightning 2.1.0.dev0, A100 (the article); torchvision's ViT "
            "(nn.MultiheadAttention, need_weights=False, which takes SDPA) modelled by transformers' ViT")


def _rb_row(key: str, script: str, batch: int, precision: str, quoted: str, *, accumulate: int = 1,
            loop: str = "Fabric") -> Row:
    settings = {"model": "torchvision vit_l_16 (IMAGENET1K_V1), 10-class head", "batch":
                f"{batch}" + (f" x {accumulate} accumulation" if accumulate > 1 else ""),
                "seq": "224x224 image (CIFAR-10 resized)", "precision": precision,
                "optimizer": "torch.optim.Adam(lr=5e-5)", "grad_ckpt": "no", "strategy": f"single GPU, {loop}",
                "lora": "no"}
    return Row(key, _RB, _RB_URL, "A100 (article)", settings, "max_memory_reserved",
               f"{script}: Memory used: {quoted} GB", float(quoted), 10**9,
               _build(_vitl, batch_size=batch, precision=precision, optimizer="adam",
                      accumulate_grad_batches=accumulate), differences=_RB_DIFF)


_LH = ("LitGPT config_hub/finetune/README.md (2024), 'Config files' table: bfloat16, Alpaca2k, max seq length 512, "
       "1xA10G")
_LH_URL = ("https://github.com/Lightning-AI/litgpt/blob/03ffc5515b251fb7e3a461efd0e3c163e45b6b3b/"
           "config_hub/finetune/README.md")
_LH_DIFF = ("'Peak memory' is LitGPT's torch.cuda.max_memory_allocated() / 1e9; the peak is taken at the longest "
            "micro-batch, assumed to reach max_seq_length 512; LitGPT's own GPT (fused QKV linear, LoRA dropout "
            "0.05) modelled by transformers' Llama/Mistral with peft LoRA on q_proj and v_proj")


_LH_GLOBAL_BATCH = {"tiny-llama/full.yaml": 32}
"""``train.global_batch_size`` of each config at the table's commit where it is not 8 (every LoRA and QLoRA
config of these rows has 8); on one device LitGPT accumulates ``global_batch_size // micro_batch_size``
micro-batches per optimizer step (``TrainArgs.gradient_accumulation_iters`` in ``litgpt/args.py``; the
``is_accumulating`` loop of ``litgpt/finetune/full.py`` and ``lora.py``), so the gradients of the trainable
parameters live through every micro-batch after the first."""


def _lh_row(key: str, config: str, model: Callable[[], Any] | str, micro: int, quoted: str,
            lora: int | None) -> Row:
    accumulate = _LH_GLOBAL_BATCH.get(config, 8) // micro
    settings = {"model": f"{config} (LitGPT checkpoint)", "batch": f"{micro} (micro-batch) x {accumulate} accumulation",
                "seq": "512 (max_seq_length)", "precision": "bf16-true", "optimizer": "AdamW",
                "grad_ckpt": "no", "strategy": "single GPU, LitGPT finetune (Fabric)",
                "lora": f"r={lora} on query and value (config_hub yaml)" if lora else "no (full)"}
    kwargs: dict[str, Any] = {"batch_size": micro, "seq_len": 512, "precision": "bf16-true", "optimizer": "adamw",
                              "accumulate_grad_batches": accumulate}
    if lora:
        kwargs["lora_rank"] = lora
    return Row(key, _LH, _LH_URL, "A10G 24 GB", settings, "max_memory_allocated", f"Peak memory {quoted} GB",
               float(quoted), 10**9, _build(model, **kwargs), differences=_LH_DIFF)


def _tinyllama() -> Any:
    """TinyLlama 1.1B (``TinyLlama-1.1B-intermediate-step-1431k-3T``)."""
    return _llama(2048, 22, 32, 4, 5632, 32000, positions=2048)


def _stablelm_3b() -> Any:
    """``stabilityai/stablelm-base-alpha-3b``: GPT-NeoX, 16 blocks of width 4096, 32 heads, MLP 16384,
    rotary on a quarter of each head, parallel residual, untied head."""
    import transformers

    return transformers.GPTNeoXConfig(hidden_size=4096, num_hidden_layers=16, num_attention_heads=32,
                                      intermediate_size=16384, vocab_size=50688, rotary_pct=0.25,
                                      max_position_embeddings=4096, use_parallel_residual=True,
                                      tie_word_embeddings=False, architectures=["GPTNeoXForCausalLM"])


def _llama32_3b() -> Any:
    """``meta-llama/Llama-3.2-3B``: tied embeddings, 128256-token vocabulary, GQA 24/8."""
    return _llama(3072, 28, 24, 8, 8192, 128256, tied=True, theta=500000.0, positions=131072)


_PM = ("PEFT method_comparison/MetaMathQA results (June 2025): Llama-3.2-3B, bfloat16 weights, batch 4, "
       "max_seq_length 768, AdamW, NVIDIA L40S")
_PM_DIFF = ("'accelerator_memory_max' is the largest torch.cuda.memory_reserved() read after an optimizer step, less "
            "the memory at start (before the model loads), over 5000 steps (method_comparison/MetaMathQA/run.py); "
            "the cache is emptied every 10 steps, so it is the reserved peak of the longest batch, assumed 4 x 768; "
            "peft keeps the adapters in fp32 (autocast_adapter_dtype=True); transformers 4.52, torch 2.7.1")


def _pm_row(key: str, path: str, commit: str, rank: int, value: int) -> Row:
    settings = {"model": "meta-llama/Llama-3.2-3B (LlamaForCausalLM)", "batch": "4", "seq": "768 (max_seq_length)",
                "precision": "bf16 weights, no AMP (bf16-true)", "optimizer": "torch AdamW(lr=1e-4, wd=0.1)",
                "grad_ckpt": "no", "strategy": "single GPU, plain PyTorch",
                "lora": f"r={rank} on q_proj, v_proj" if rank else "no (full fine-tuning)"}
    field = "accelerator_memory_max" if "rank64" in path else "cuda_memory_max"
    lora = {"lora_rank": rank} if rank else {}
    return Row(key, _PM, f"https://github.com/huggingface/peft/blob/{commit}/{path}", "L40S 48 GB", settings,
               "max_memory_reserved", f'"{field}": {value}', value, 1,
               _build(_llama32_3b, batch_size=4, seq_len=768, precision="bf16-true", optimizer="adamw", **lora),
               differences=_PM_DIFF)


def _lh_qlora_row(key: str, config: str, preset: Callable[[], Any] | str, micro: int, quoted: str) -> Row:
    row = _lh_row(key, config, preset, micro, quoted, 32)
    settings = {**row.settings, "lora": "r=32 on query and value, base bnb.nf4 (config_hub qlora.yaml)",
                "optimizer": "bitsandbytes PagedAdamW (instantiate_bnb_optimizer)"}
    build = _build(preset, batch_size=micro, seq_len=512, precision="bf16-true", optimizer="adamw", lora_rank=32,
                   quantization="nf4", skip_modules=[], accumulate_grad_batches=8 // micro)
    return dataclasses.replace(row, settings=settings, estimate=build,
                               differences=row.differences + "; --quantize bnb.nf4 through Lightning's "
                               "BitsandbytesPrecision, every nn.Linear quantized (the LM head included)")


def _scratch_gpt(vocab: int, attention: str, norms: str) -> Any:
    """The GPT-2-small-sized model of "Build a Large Language Model (From Scratch)", chapter 5 bonus
    ``10_llm-training-speed``: 12 blocks of width 768, 12 heads, context 1024, no QKV bias, dropout
    0.1, an untied output head. ``attention="sdpa"``: one fused QKV linear into
    ``F.scaled_dot_product_attention(is_causal=True)``; ``"scratch"``: the book's attention (scores,
    a causal mask made on the fly, softmax, dropout on the weights). ``norms="native"``:
    ``nn.LayerNorm`` and ``nn.GELU("tanh")``; ``"scratch"``: the book's LayerNorm (mean, variance)
    and tanh GELU written out."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    dim, heads, context, drop = 768, 12, 1024, 0.1

    class LayerNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale, self.shift = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            return self.scale * ((x - mean) / torch.sqrt(var + 1e-5)) + self.shift

    class GELU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x * (1 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))

    def norm() -> nn.Module:
        return nn.LayerNorm(dim) if norms == "native" else LayerNorm()

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.proj = nn.Linear(dim, dim)
            self.drop = nn.Dropout(drop)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            if attention == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop if self.training else 0.0,
                                                     is_causal=True)
            else:
                scores = q @ k.transpose(2, 3)
                mask = torch.triu(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=1)
                scores = scores.masked_fill(mask, float("-inf"))
                out = self.drop(torch.softmax(scores / (dim // heads) ** 0.5, dim=-1)) @ v
            return self.proj(out.transpose(1, 2).reshape(b, n, dim))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.att, self.norm2 = norm(), Attention(), norm()
            self.ff = nn.Sequential(nn.Linear(dim, 4 * dim),
                                    nn.GELU(approximate="tanh") if norms == "native" else GELU(),
                                    nn.Linear(4 * dim, dim))
            self.drop = nn.Dropout(drop)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.drop(self.att(self.norm1(x)))
            return x + self.drop(self.ff(self.norm2(x)))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_emb, self.pos_emb = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
            self.drop = nn.Dropout(drop)
            self.blocks = nn.Sequential(*(Block() for _ in range(12)))
            self.final_norm = norm()
            self.out_head = nn.Linear(dim, vocab, bias=False)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            pos = self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
            return self.out_head(self.final_norm(self.blocks(self.drop(self.tok_emb(idx) + pos))))

    with torch.device("meta"):
        return GPT()


def _scratch_loss(logits: Any, batch: Any) -> Any:
    """``calc_loss_batch``: cross-entropy of the flattened logits against the (shifted) token ids."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1), batch[0].flatten())


def _scratch(vocab: int, attention: str, norms: str, batch: int, precision: str, fused: bool,
             ) -> Callable[[], tuple[Any, dict[str, Any]]]:
    def build() -> tuple[Any, dict[str, Any]]:
        import torch

        tokens = torch.zeros(batch, 1024, dtype=torch.long)
        return _scratch_gpt(vocab, attention, norms), {"example_input": (tokens,), "loss_fn": _scratch_loss,
                                                      "precision": precision,
                                                      "optimizer": _fused_adamw() if fused else "adamw"}
    return build


_LS = ("Raschka, LLMs-from-scratch, ch05/10_llm-training-speed/README.md (2025), 'Single GPU speed comparisons' "
       "(A100, PyTorch 2.6.0+cu124)")
_LS_URL = ("https://github.com/rasbt/LLMs-from-scratch/blob/06361583d01a650412400ce01cf2be9efaec3b99/"
           "ch05/10_llm-training-speed/README.md")
_LS_DIFF = ("'Reserved memory' is torch.cuda.memory_reserved() / 1024**3 printed after an epoch (training steps, "
            "evaluation and generation under no_grad; the cache is never emptied, so it is the reserved peak); "
            "the model is written out in this script after the repository's code")


def _ls_row(key: str, step: str, vocab: int, attention: str, norms: str, batch: int, precision: str,
            quoted: str, compiled: bool = False, fused: bool = True) -> Row:
    """One row of the notes; steps 3 on use ``AdamW(fused=True)``, step 1 the default (``foreach``)."""
    settings = {"model": f"GPT-124M of the book (vocab {vocab}, untied head), attention {attention}, "
                         f"LayerNorm/GELU {norms}", "batch": str(batch), "seq": "1024",
                "precision": "fp32 (TF32 matmuls)" if precision == "32-true" else "model.to(bfloat16) (bf16-true)",
                "optimizer": f"AdamW(lr=5e-4, weight_decay=0.1{', fused=True' if fused else ''})", "grad_ckpt": "no",
                "strategy": f"single GPU, plain PyTorch{', torch.compile' if compiled else ''}", "lora": "no"}
    diff = _LS_DIFF + ("; torch.compile fuses elementwise ops, which memguard traces eager" if compiled else "")
    return Row(key, _LS, _LS_URL, "A100", settings, "max_memory_reserved", f"{step}: Reserved memory: {quoted} GB",
               float(quoted), 2**30, _scratch(vocab, attention, norms, batch, precision, fused), differences=diff)


NEW_ROWS: tuple[Row, ...] = (
    _ao_row("ao-vith-adamw", _AO, _AO_URL, "torch AdamW(fused=True)", "adamw-fused", "12.23", True),
    _ao_row("ao-vith-bnb8", _AO, _AO_URL, "bitsandbytes AdamW8bit", "adamw-8bit", "8.32", True),
    _ao_row("ao-vith-ao8", _AO, _AO_URL, "torchao AdamW8bit (block 256)", "adamw-8bit", "8.33", True),
    _ao_row("aop-vith-adamw", _AOP, _AOP_URL, "torch.optim.Adam (foreach, CUDA's default; weight_decay 0)", "adam",
            "12.94", False),
    _ao_row("aop-vith-bnb8", _AOP, _AOP_URL, "bitsandbytes Adam8bit", "adamw-8bit", "8.31", False),
    _ao_row("aop-vith-ao8", _AOP, _AOP_URL, "torchao Adam8bit (block 2048)", "adamw-8bit", "8.31", False),
    _rb_row("rb-01-fp32", "01_pytorch-vit.py", 64, "32-true", "26.79", loop="plain PyTorch"),
    _rb_row("rb-01-2-fabric", "01-2_pytorch-fabric.py", 64, "32-true", "26.84"),
    _rb_row("rb-02-16-mixed", "02_mixed-precision.py", 64, "16-mixed", "18.21"),
    _rb_row("rb-03-bf16-true", "03_bfloat16.py", 64, "bf16-true", "13.82"),
    _rb_row("rb-04-b16", "04_lower-batchsize.py", 16, "bf16-true", "5.69"),
    _rb_row("rb-05-accum", "05_gradient-accum.py", 4, "bf16-true", "3.91", accumulate=4),
    _lh_row("lh-tinyllama-full", "tiny-llama/full.yaml", _tinyllama, 4, "14.10", None),
    _lh_row("lh-llama2-7b-lora", "llama-2-7b/lora.yaml", "llama-2-7b", 2, "19.77", 32),
    _lh_row("lh-llama3-8b-lora", "llama-3-8b/lora.yaml", "llama-3-8b", 1, "19.73", 32),
    _lh_row("lh-mistral-7b-lora", "mistral-7b/lora.yaml", "mistral-7b", 2, "20.66", 32),
    _pm_row("pm-lora-r32", "method_comparison/MetaMathQA/results/lora--llama-3.2-3B-rank32.json",
            "0a179c1e8659ab4f7df0369b9b03943cfe470ff1", 32, 22273851392),
    _pm_row("pm-full",
            "method_comparison/MetaMathQA/results/full-finetuning--llama-3.2-3B-lr_0.00001.json",
            "0a179c1e8659ab4f7df0369b9b03943cfe470ff1", 0, 37241225216),
    _lh_row("lh-stablelm-3b-lora", "stablelm-base-alpha-3b/lora.yaml", _stablelm_3b, 1, "8.58", 32),
    _lh_qlora_row("lh-stablelm-3b-qlora", "stablelm-base-alpha-3b/qlora.yaml", _stablelm_3b, 1, "5.24"),
    _lh_qlora_row("lh-llama2-7b-qlora", "llama-2-7b/qlora.yaml", "llama-2-7b", 2, "13.68"),
    _lh_qlora_row("lh-llama3-8b-qlora", "llama-3-8b/qlora.yaml", "llama-3-8b", 2, "17.41"),
    _lh_qlora_row("lh-mistral-7b-qlora", "mistral-7b/qlora.yaml", "mistral-7b", 2, "14.29"),
    _ls_row("ls-1-fp32", "1. causal mask on the fly", 50257, "scratch", "scratch", 8, "32-true", "26.2422",
            fused=False),
    _ls_row("ls-5-bf16", "5. bfloat16", 50257, "scratch", "scratch", 8, "bf16-true", "13.7871"),
    _ls_row("ls-6-native", "6. PyTorch LayerNorm, GELU", 50257, "scratch", "native", 8, "bf16-true", "11.5645"),
    _ls_row("ls-7-sdpa", "7. FlashAttention", 50257, "sdpa", "native", 8, "bf16-true", "5.9004"),
    _ls_row("ls-9-vocab", "9. vocab 50304", 50304, "sdpa", "native", 8, "bf16-true", "5.8906", compiled=True),
    _ls_row("ls-10-b32", "10. batch 32", 50304, "sdpa", "native", 32, "bf16-true", "22.5078", compiled=True),
    _pm_row("pm-lora-r64", "method_comparison/MetaMathQA/results/lora--llama-3.2-3B-rank64.json",
            "18e07f189c06cbc6472e4e3ec180358319de8175", 64, 22540189696),
)
"""Rows of 2023 and later from sources the rows above do not use (``--set new``)."""

ALL_ROWS: tuple[Row, ...] = ROWS + NEW_ROWS


# --------------------------------------------------------------------------- estimates


def predict(row: Row, method: str) -> dict[str, Any]:
    """memguard's estimate of ``row`` by ``method``: the bytes it predicts and the error."""
    import memguard

    if row.estimate is None:
        raise ValueError(f"row {row.key!r} has no estimate to run")
    model, kwargs = row.estimate()
    extra = {"trace_timeout": TRACE_TIMEOUT_S} if method == "trace" else {}
    start = time.perf_counter()
    try:
        est = memguard.estimate(model, method=method, device="cuda", **kwargs, **extra)
    except Exception as exc:  # a method that cannot handle the model: reported, not fatal
        return {"error": type(exc).__name__, "message": str(exc)[:300],
                "seconds": round(time.perf_counter() - start, 2)}
    seconds = time.perf_counter() - start
    reserved = getattr(est, "reserved_bytes", None)
    out: dict[str, Any] = {"peak_bytes": est.peak_bytes, "reserved_bytes": reserved,
                           "total_bytes": est.total_bytes, "seconds": round(seconds, 2),
                           "notes": list(est.notes)}
    predicted = getattr(est, QUANTITY[row.measured], None)
    out["predicted_bytes"] = predicted
    out["error"] = _error(predicted, row.measured_bytes)
    # The band's workspaces go through the caching allocator: the upper end of every statistic adds them;
    # NCCL's buffers do not (cuda_rules.nccl_buffer_bytes): only NVML's "used" sees them.
    from memguard.estimation.cuda_rules import NCCL_BAND_ITEM

    band = dict(getattr(est, "band", {}))
    out["band"] = band
    seen = {k: v for k, v in band.items() if row.measured == "nvml_used" or not k.startswith(NCCL_BAND_ITEM)}
    out["upper_predicted_bytes"] = None if predicted is None else predicted + sum(seen.values())
    out["upper_error"] = _error(out["upper_predicted_bytes"], row.measured_bytes)
    if row.secondary is not None:
        kind, _, value = row.secondary
        out["secondary_predicted_bytes"] = getattr(est, QUANTITY[kind], None)
        out["secondary_error"] = _error(out["secondary_predicted_bytes"], round(value * row.unit))
    if row.context_mib is not None and reserved is not None:
        out["predicted_with_source_context_bytes"] = reserved + row.context_mib * MiB
        out["error_with_source_context"] = _error(out["predicted_with_source_context_bytes"], row.measured_bytes)
    return out


def _error(predicted: int | None, measured: int) -> float | None:
    return None if predicted is None else (predicted - measured) / measured


def evaluate(rows: Sequence[Row], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Every row with its predictions, as JSON-ready records."""
    records = []
    for row in rows:
        print(f"{row.key} ...", file=sys.stderr, flush=True)
        record = {k: v for k, v in dataclasses.asdict(row).items() if k not in ("estimate", "unit")}
        record["measured_bytes"] = row.measured_bytes
        record["unit_bytes"] = row.unit
        record["predictions"] = ({} if row.incomplete or row.estimate is None
                                 else {m: predict(row, m) for m in methods})
        records.append(record)
    return records


# --------------------------------------------------------------------------- display


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _settings_line(s: Mapping[str, str]) -> str:
    return (f"b={s['batch']}, s={s['seq']}, {s['precision']}, {s['optimizer']}, ckpt={s['grad_ckpt']}, "
            f"{s['strategy']}, lora={s['lora']}")


def table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """The comparison table: one line per row, predictions in GiB, errors in %."""
    headers = ["row", "GPU", "measured", "GiB"]
    for m in methods:
        headers += [f"{m} GiB", f"{m} err", f"{m} upper err", f"{m} 2nd"]
    lines = []
    for r in records:
        line = [r["key"], r["gpu"].split(" (")[0][:24], r["measured"], f"{r['measured_bytes'] / 2**30:.2f}"]
        for m in methods:
            p = r["predictions"].get(m)
            if r["incomplete"]:
                line += ["settings incomplete", "", "", ""]
            elif p is None or "predicted_bytes" not in p:
                line += ["failed", "", "", ""]
            else:
                second = p.get("error_with_source_context", p.get("secondary_error"))
                line += [_gib(p["predicted_bytes"]), _pct(p["error"]), _pct(p.get("upper_error")), _pct(second)]
        lines.append(line)
    return render_table(headers, lines)


def _errors(records: Sequence[dict[str, Any]], method: str) -> dict[str, dict[str, float]]:
    """Errors by compared quantity: ``{quantity: {row key: error}}``."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        p = r["predictions"].get(method, {})
        pairs = [(r["measured"], p.get("error")), (f"{r['measured']}, upper end", p.get("upper_error")),
                 ("nvml_used, source context", p.get("error_with_source_context"))]
        if r["secondary"]:
            pairs.append((r["secondary"][0], p.get("secondary_error")))
        for quantity, err in pairs:
            if isinstance(err, float):  # a method that failed has its exception's name under "error"
                out.setdefault(quantity, {})[r["key"]] = err
    return out


def summary(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method and compared quantity: rows, median |error|, the worst under- and over-estimate."""
    out: dict[str, Any] = {}
    for m in methods:
        for quantity, errs in _errors(records, m).items():
            low, high = min(errs, key=errs.__getitem__), max(errs, key=errs.__getitem__)
            out[f"{m} / {quantity}"] = {"rows": len(errs), "median_abs": median([abs(e) for e in errs.values()]),
                                        "min": [low, errs[low]], "max": [high, errs[high]]}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", help="comma-separated row keys (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="trace,formula")
    parser.add_argument("--json", type=Path, help="write the rows with predictions to this file")
    parser.add_argument("--set", choices=("old", "new", "all"), default="all",
                        help="old: the rows before issue 17; new: 2023+ rows of other sources; all (default)")
    parser.add_argument("--plot", type=Path, help="draw the error distribution of the rows run to this PNG")
    args = parser.parse_args(argv)
    pool = {"old": ROWS, "new": NEW_ROWS, "all": ALL_ROWS}[args.set]
    rows = pool if not args.rows else tuple(r for r in ALL_ROWS if r.key in args.rows.split(","))
    methods = [m for m in args.methods.split(",") if m]
    start = time.perf_counter()
    records = evaluate(rows, methods)
    print(table(records, methods))
    print("err: prediction of the measured quantity (nvml_used: estimate.total_bytes, with memguard's own "
          "context). 2nd: nvml_used rows: reserved_bytes + the CUDA context the source measured; "
          "optimum-benchmark rows: reserved_bytes against the run's max_memory_reserved")
    for r in records:
        print(f"  {r['key']}: {r['source'].split(',')[0]}; {r['settings']['model']}; "
              f"{_settings_line(r['settings'])}; quoted {r['quoted']!r}"
              + (f"; SETTINGS INCOMPLETE: {r['incomplete']}" if r["incomplete"] else ""))
    stats = summary(records, methods)
    for name, s in stats.items():
        print(f"{name:42s} rows {s['rows']:2d}  median |err| {s['median_abs'] * 100:5.1f}%  "
              f"min {s['min'][1] * 100:+6.1f}% ({s['min'][0]})  max {s['max'][1] * 100:+6.1f}% ({s['max'][0]})")
    seconds = time.perf_counter() - start
    print(f"{len(records)} rows ({sum(1 for r in records if r['incomplete'])} with settings incomplete) "
          f"in {seconds:.0f} s")
    if args.json:
        write_json(args.json, {"machine": machine_info("cpu"), "seconds": round(seconds, 1),
                               "methods": methods, "summary": stats, "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
