"""The ``memguard`` command line: argparse with one-line errors, value checks, and the subcommands.

Building the parser imports neither torch nor the estimator, so ``--help``, ``--version`` and a
usage error answer at once; :func:`memguard.cli.main` imports the estimator (:func:`import_estimator`)
once the command line is read, where a Ctrl-C or a broken install is one line on stderr.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import memguard
from memguard.cli import _commands, _plot
from memguard.cli._output import PROG
from memguard.errors import ConfigError, MemguardError
from memguard.fit import check_margin

__all__ = ["METHODS", "TRACE_TIMEOUT", "Parser", "UsageError", "build_parser", "import_estimator"]

TRACE_TIMEOUT = 120.0
"""memguard.estimation.trace.DEFAULT_TIMEOUT, without importing torch to build the parser."""

METHODS = ("auto", "trace", "formula", "seed")
"""memguard.estimation.estimator.METHODS, without importing torch to build the parser."""

MAX_COUNT = 2**31 - 1
"""memguard.estimation.spec.MAX_COUNT, without importing torch to read a count."""


EXIT_STATUS = ("exit status: 0 success (check: it fits); 1 it does not fit (check, max-batch, plan); 2 bad usage "
               "or input, one line on stderr; 3 internal error (a bug), one line on stderr; 130 interrupted; "
               "141 stdout closed early")
"""The exit statuses of :mod:`memguard.cli._output`, for ``--help``."""


class UsageError(Exception):
    """A command line argparse cannot read; the message is argparse's, with a hint."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become one line on stderr instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- values --------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """A whole number from 1 to :data:`~memguard.estimation.spec.MAX_COUNT`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text} is past any device; at most {MAX_COUNT:,}")
    return value


def names(text: str) -> list[str]:
    """``"lm_head,model.layers.0"`` -> module names; ``""`` -> none."""
    found = [n.strip() for n in text.split(",")]
    if any(not n for n in found) and text.strip():
        raise argparse.ArgumentTypeError(f"module names must be comma-separated, got {text!r}")
    return [n for n in found if n]


def margin(text: str) -> float:
    """``0.1`` or ``10%``: the share of the GPU's free memory to keep spare (:func:`memguard.fit.check_margin`)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.1 or 10%, got {text!r}") from None
    try:
        return check_margin(value)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1 (0% to 99%), got {text!r}") from None


def count(text: str) -> int:
    """A whole number, zero allowed."""
    return 0 if text.strip() == "0" else positive_int(text)


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def routing(text: str) -> str | float:
    """``balanced``, ``worst`` or a capacity factor >= 1 (``memguard.estimation.stand_ins.resolve_routing``)."""
    name = text.strip().lower()
    if name in ("balanced", "worst"):
        return name
    try:
        value = float(name)
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected balanced, worst or a capacity factor >= 1, got {text!r}")
    return value


def import_estimator(*, torch: bool = True) -> Any:
    """``memguard.estimation.estimator`` and, with ``torch``, torch, or a one-line error naming what broke.

    A broken install anywhere below torch (a ``pynvml.py`` that raises on import, which torch
    imports too; a half-removed package) would otherwise end the command with a traceback. Without
    ``torch`` (a formula estimate of a preset, which reads its shipped description) torch is left out.
    """
    import importlib

    try:
        estimator = importlib.import_module("memguard.estimation.estimator")
        if torch:
            importlib.import_module("torch")
        return estimator
    except MemguardError:
        raise
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f", raised in {tb.tb_frame.f_code.co_filename}" if tb is not None else ""
        raise MemguardError(f"cannot load the estimator and torch ({type(exc).__name__}: {exc}{where}); "
                            "repair or reinstall the package that file belongs to") from None


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> Parser:
    """The ``memguard`` parser; each subcommand's ``run`` default is its function."""
    output, model = _output_options(), _model_options(METHODS)
    batch = Parser(add_help=False)
    batch.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                       help="samples per step on one device (default: 1)")
    gpu = _gpu_options()
    parser = Parser(prog=PROG, description="Predict the peak memory of a training step before it runs.",
                    epilog=EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"{PROG} {memguard.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(commands, output=output, model=model, batch=batch, gpu=gpu)
    _add_report(commands, output)
    return parser


def _output_options() -> Parser:
    output = Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON on stdout, for machines")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines and no warnings on stderr")
    return output


def _model_options(methods: Any) -> Parser:
    """MODEL and how its step runs: what :func:`memguard.estimate` takes besides the batch size."""
    model = Parser(add_help=False)
    model.add_argument("model", metavar="MODEL", nargs="?", default=None,
                       help="a preset name (e.g. gpt2, llama-3-8b), a config.json path or model "
                            "directory, or package.module:factory returning an nn.Module (or from --config)")
    model.add_argument("--seq-len", type=positive_int, metavar="N",
                       help="tokens per sample (default: the model's maximum, where it has one); an "
                            "encoder-decoder's encoder tokens")
    model.add_argument("--decoder-seq-len", type=positive_int, metavar="N",
                       help="an encoder-decoder's decoder tokens per sample, the labels' length (default: "
                            "--seq-len for T5 and BART; Whisper's max_target_positions, 448)")
    model.add_argument("--precision", default="32-true",
                       help="Lightning precision: 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true "
                            "(default: %(default)s)")
    model.add_argument("--optimizer", default="adamw",
                       help="adamw (torch's default: foreach on CUDA), adamw-fused (fused=True, the transformers "
                            "Trainer's adamw_torch_fused), adamw-foreach, adam, adamw-8bit, paged-adamw, "
                            "paged-adamw-8bit, sgd, sgd-momentum, adafactor or none (default: %(default)s)")
    model.add_argument("--method", choices=methods, default=None,
                       help="how to estimate: trace the step on fake tensors, or use a formula "
                            "(default: auto, which traces and falls back to the formula)")
    model.add_argument("--device", default="cuda",
                       help="where training runs: cuda or cpu (default: %(default)s)")
    model.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="force activation checkpointing on or off (default: as the model is set)")
    model.add_argument("--strategy", default="single",
                       help="single, ddp, fsdp, fsdp_shard_grad_op, fsdp_hybrid, deepspeed_stage_1/2/3, or a "
                            "Lightning strategy name (default: %(default)s); the estimate is per device")
    model.add_argument("--world-size", type=positive_int, default=1, metavar="N",
                       help="data-parallel processes (default: %(default)s)")
    model.add_argument("--offload-optimizer", action="store_true",
                       help="optimizer state and step in host memory (sharded strategies)")
    model.add_argument("--offload-params", action="store_true",
                       help="parameter shards in host memory (fsdp, deepspeed_stage_3)")
    model.add_argument("--lora-rank", type=positive_int, default=None, metavar="R",
                       help="fine-tune LoRA adapters of rank R on a frozen base model (needs peft)")
    model.add_argument("--quantization", choices=("nf4", "fp4", "int8"), default=None,
                       help="store the base's linear layers as bitsandbytes does: nf4 or fp4 (4-bit, QLoRA) or int8 "
                            "(LLM.int8); the base is frozen and LoRA adapters train over it (default: as the model is)")
    model.add_argument("--double-quant", action="store_true",
                       help="quantize the 4-bit quantization constants again (bnb_4bit_use_double_quant, QLoRA's)")
    model.add_argument("--skip-modules", type=names, default=None, metavar="NAME,...",
                       help="linear layers left unquantized, as transformers' llm_int8_skip_modules (default: the "
                            "output head; '' for none, as Lightning's plugin)")
    _loop_options(model)
    model.add_argument("--moe-routing", type=routing, default="balanced", metavar="R",
                       help="how a mixture-of-experts router spreads the tokens: balanced (top_k * tokens / "
                            "experts each), worst (all on the same top_k experts) or a capacity factor such as "
                            "1.25 (default: %(default)s)")
    model.add_argument("--trace-timeout", type=seconds, default=TRACE_TIMEOUT, metavar="S",
                       help="seconds a trace may run before it gives up, and auto falls back to the formula "
                            "(default: %(default)g)")
    _config_option(model)
    return model


def _loop_options(model: Parser) -> None:
    """How the user's loop runs the step: accumulation, ``zero_grad`` and whether it keeps the output."""
    model.add_argument("--accumulate-grad-batches", type=positive_int, default=1, metavar="N",
                       help="micro-batches per optimizer step; from the second on, each forward runs beside the "
                            "gradients (default: %(default)s)")
    model.add_argument("--set-to-none", action=argparse.BooleanOptionalAction, default=True,
                       help="zero_grad(set_to_none=...): --no-set-to-none keeps zeroed gradients alive, torch's "
                            "default before 2.0 (default: set to none)")
    model.add_argument("--keep-output", action=argparse.BooleanOptionalAction, default=None,
                       help="the loop keeps the model's output to the next forward (outputs = model(**batch)): "
                            "its logits and returned key/value cache are counted; --no-keep-output: it is dropped "
                            "before backward, as the transformers Trainer and Lightning do (default: not known, "
                            "the output's bytes are in the band)")


def _config_option(model: Parser) -> None:
    """``--config FILE``: the run's LightningCLI YAML, TrainingArguments or DeepSpeed file (memguard.run_config)."""
    model.add_argument("--config", metavar="FILE", default=None,
                       help="read the run from its own file: a LightningCLI YAML, transformers TrainingArguments "
                            "(JSON/YAML) or a DeepSpeed JSON; flags given here win over the file")


def _add_report(commands: Any, output: Parser) -> None:
    """``memguard report LOGDIR``: predicted against actual, from what the callbacks logged."""
    from memguard.cli import _report

    sub = commands.add_parser("report", parents=[output],
                              help="predicted vs actual peak memory from the callbacks' logs (CSV, TensorBoard, "
                                   "trainer_state.json)")
    sub.add_argument("logdir", metavar="LOGDIR", help="a folder searched recursively for the logs")
    sub.set_defaults(run=_report.cmd_report)


def _gpu_options() -> Parser:
    gpu = Parser(add_help=False)
    gpu.add_argument("--gpu", default="auto",
                     help="the GPU to fit: auto (this machine's current CUDA device), a CUDA index (0, "
                          "cuda:1), a catalog name such as A100-40GB (see 'memguard gpus --catalog'), a "
                          "size such as 24GiB (binary) or 24GB (decimal, 10^9), a share such as 80%% (of the "
                          "CUDA device; '50%% of cpu'), or cpu (default: %(default)s)")
    gpu.add_argument("--margin", type=margin, default=0.1,
                     help="share of the GPU's free memory to keep spare, 0.1 or 10%% (default: 0.1)")
    return gpu


def _add_commands(commands: Any, *, output: Parser, model: Parser, batch: Parser, gpu: Parser) -> None:
    """The subcommands, each with the options it shares and its own."""
    sub = commands.add_parser("estimate", parents=[model, batch, output],
                              help="the memory breakdown of one training step")
    sub.add_argument("--top", type=count, default=5, metavar="K",
                     help="show the K largest groups of tensors alive at the peak, by module (trace only; "
                          "default: %(default)s, 0 for none)")
    sub.set_defaults(run=_commands.cmd_estimate)
    sub = commands.add_parser("check", parents=[model, batch, gpu, output],
                              help="whether a training step fits the GPU (exit 0 fits, 1 does not)")
    sub.set_defaults(run=_commands.cmd_check)
    sub = commands.add_parser("max-batch", parents=[model, gpu, output],
                              help="the largest batch size that fits the GPU")
    sub.add_argument("--limit", type=positive_int, default=1 << 16, metavar="N",
                     help="the largest batch size considered (default: %(default)s)")
    sub.set_defaults(run=_commands.cmd_max_batch)
    sub = commands.add_parser("plot", parents=[model, batch, gpu, output],
                              help="a picture of memory against batch size and sequence length")
    sub.add_argument("-o", "--output", required=True, metavar="FILE",
                     help="the image to write (.png, .svg, .pdf)")
    sub.add_argument("--limit", type=positive_int, default=1 << 16, metavar="N",
                     help="the largest batch size considered (default: %(default)s)")
    sub.add_argument("--timeline", action="store_true",
                     help="draw live memory through one traced step at --batch-size instead (phases, peak)")
    sub.set_defaults(run=_plot.cmd_plot)
    sub = commands.add_parser("plan", parents=[model, batch, gpu, output],
                              help="what would make a step fit the GPU, cheapest first, with the flags for check")
    sub.add_argument("--gpus", type=positive_int, default=None, metavar="N",
                     help="GPUs you own: strategies are searched on 1 to N of them, the effective batch split "
                          "among them (default: --world-size)")
    sub.add_argument("--top", type=positive_int, default=10, metavar="K",
                     help="rows per group (full fine-tuning, LoRA) (default: %(default)s)")
    sub.add_argument("--confirm", type=count, default=None, metavar="K",
                     help="best rows per group confirmed with the trace; 0: the formula alone (default: every "
                          "row shown)")
    sub.set_defaults(run=_commands.cmd_plan)
    sub = commands.add_parser("gpus", parents=[output], help="the GPUs this machine sees, and their memory")
    sub.add_argument("--catalog", action="store_true", help="also list the GPUs memguard knows by name")
    sub.set_defaults(run=_commands.cmd_gpus)
