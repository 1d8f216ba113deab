"""Presets build offline, on the meta device, with the parameter counts of the published models."""

from __future__ import annotations

import pytest
import torch

from memguard import ConfigError
from memguard.estimation.inputs import TaskKind, make_batch, model_task
from memguard.estimation.models import MAX_CONFIG_BYTES, close_presets, list_presets, load_model

# Parameter counts of the published checkpoints (tied embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "vit-base": 86_567_656,
}


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_meta(name: str) -> None:
    resolved = load_model(name)
    params = list(resolved.module.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    if name in PUBLISHED:
        assert sum(p.numel() for p in params) == PUBLISHED[name]


def test_presets_cover_the_issue() -> None:
    expected = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base-uncased", "bert-base-cased",
                "bert-large-uncased", "bert-large-cased", "roberta-base", "t5-small", "t5-base", "llama-2-7b",
                "llama-2-13b", "llama-3-8b", "mistral-7b", "vit-base"}
    assert expected <= set(list_presets())


@pytest.mark.parametrize(("alias", "preset"), [
    ("GPT2", "gpt2"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("bert_base", "bert-base-uncased"),
    ("google/vit-base-patch16-224", "vit-base"),
])
def test_forgiving_names(alias: str, preset: str) -> None:
    assert load_model(alias).name == preset


@pytest.mark.parametrize(("name", "meant"), [
    ("gpt-2", ["gpt2"]),
    ("GPT_2", ["gpt2"]),
    ("mistral", ["mistral-7b"]),
    ("mistralai/Mistral-7B-Instruct-v0.2", ["mistral-7b"]),
    ("llama-7b", ["llama-2-7b", "llama-3-8b", "llama-2-13b"]),
    ("t5-large", ["t5-base", "gpt2-large", "bert-large-uncased"]),
    ("roberta-large", ["roberta-base", "bert-large-uncased", "bert-large-cased"]),
    ("gpt2-xxl", ["gpt2-xl", "gpt2", "gpt2-large"]),
    ("resnet50", []),
])
def test_unknown_presets_say_which_was_meant(name: str, meant: list[str]) -> None:
    assert close_presets(name) == meant
    with pytest.raises(ConfigError) as info:
        load_model(name)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}: not a preset, not an existing config.json or model directory, "
                              "nor a 'package.module:factory'.")
    if meant:
        quoted = [repr(m) for m in meant]
        listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        assert f"'package.module:factory'. Did you mean {listed}? Presets: bert-base-cased," in message
    else:
        assert "Did you mean" not in message


@pytest.mark.parametrize(("name", "task", "keys"), [
    ("gpt2", "causal-lm", {"input_ids": (3, 16), "labels": (3, 16)}),
    ("bert-base-uncased", "masked-lm", {"input_ids": (3, 16), "labels": (3, 16)}),
    ("t5-small", "seq2seq", {"input_ids": (3, 16), "labels": (3, 16)}),
    ("vit-base", "image-cls", {"pixel_values": (3, 3, 224, 224), "labels": (3,)}),
])
def test_batches_fit_the_head(name: str, task: str, keys: dict) -> None:
    module = load_model(name).module
    assert model_task(module) == task
    batch = make_batch(module, 3, 16)
    assert {k: tuple(v.shape) for k, v in batch.items()} == keys
    if "input_ids" in batch:
        assert batch["input_ids"].dtype == torch.long
        assert int(batch["input_ids"].max()) < module.config.vocab_size


def test_task_kinds_own_what_they_take() -> None:
    rules = {  # kind: (pixels, tokens, a label per token, a label per sample, head)
        "causal-lm": (False, True, True, False, "causal-lm"),
        "masked-lm": (False, True, True, False, "masked-lm"),
        "seq2seq": (False, True, True, False, "seq2seq"),
        "seq-cls": (False, True, False, True, "seq-cls"),
        "image-cls": (True, False, False, True, "image-cls"),
        "token-base": (False, True, False, False, "base"),
        "image-base": (True, False, False, False, "base"),
        "unknown": (False, False, False, False, "unknown"),
    }
    assert set(rules) == {k.value for k in TaskKind}
    for value, rule in rules.items():
        kind = TaskKind(value)
        assert (kind.takes_pixels, kind.takes_tokens, kind.labels_per_token, kind.labels_per_sample,
                kind.head) == rule, value
        assert str(kind) == f"{kind}" == value


@pytest.mark.parametrize(("config", "task", "keys"), [
    ("BertConfig", TaskKind.TOKEN_BASE, {"input_ids": (2, 8)}),
    ("BertConfig:BertForSequenceClassification", TaskKind.SEQ_CLS, {"input_ids": (2, 8), "labels": (2,)}),
    ("ViTConfig", TaskKind.IMAGE_BASE, {"pixel_values": (2, 3, 32, 32)}),
])
def test_batches_of_base_models_and_classifiers(config: str, task: TaskKind, keys: dict) -> None:
    import transformers

    config_name, _, model_name = config.partition(":")
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 1}
    cfg = getattr(transformers, config_name)(**small, **({"image_size": 32, "patch_size": 8}
                                                        if config_name == "ViTConfig" else {"vocab_size": 64}))
    cls = getattr(transformers, model_name or config_name.replace("Config", "Model"))
    with torch.device("meta"):
        module = cls(cfg)
    assert model_task(module) is task
    batch = make_batch(module, 2, None if task.takes_pixels else 8, device="meta")
    assert {k: tuple(v.shape) for k, v in batch.items()} == keys


def test_no_batch_for_an_unknown_task() -> None:
    module = torch.nn.Linear(3, 3)
    assert model_task(module) is TaskKind.UNKNOWN
    with pytest.raises(ConfigError, match="pass example_input="):
        make_batch(module, 2, 8)


def test_factory_string(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(3, 3)\nnot_a_module = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_model("mymodels:build").module, torch.nn.Linear)
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_model("mymodels:nope")
    with pytest.raises(ConfigError, match=r"not a torch\.nn\.Module"):
        load_model("mymodels:not_a_module")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:build")


def test_a_config_json_is_read_up_to_16_mib(tmp_path) -> None:
    config = b'{"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}'
    at_limit = tmp_path / "at_limit.json"
    at_limit.write_bytes(config + b" " * (MAX_CONFIG_BYTES - len(config)))  # padding JSON allows
    assert at_limit.stat().st_size == MAX_CONFIG_BYTES == 16 * 2**20
    assert load_model(str(at_limit)).config.n_embd == 32
    over = tmp_path / "over.json"
    over.write_bytes(config + b" " * (MAX_CONFIG_BYTES + 1 - len(config)))
    with pytest.raises(ConfigError, match=r"16,777,217 bytes, too large for a config\.json"):
        load_model(str(over))


def test_factory_classes_and_modules_are_taken_as_they_are(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymodels2.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(2, 2)\n"
        "ready = torch.nn.Linear(4, 4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_model("mymodels2:Net").module, torch.nn.Linear)  # a class is a factory
    assert load_model("mymodels2:ready").module.in_features == 4  # a module is used as it is


LORA_HWM = '''
import sys, torch
from transformers import LlamaConfig
from memguard.estimation.models import add_lora, load_model

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = load_model(LlamaConfig(hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                              vocab_size=64))
before = hwm()
lora = add_lora(base, 4096).module
devices = sorted({p.device.type for p in lora.parameters()})
trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
print(hwm() - before, trainable, ",".join(devices))
'''


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_lora_adapters_of_a_meta_model_are_built_on_meta(tmp_path) -> None:
    """peft built each adapter on the CPU before moving it to the base layer's meta device: rank 4096 on
    the q and v projections of one 4096-wide layer is 4 x 4096 x 4096 fp32 = 256 MiB resident, for nothing."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LORA_HWM], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    grown, trainable, devices = proc.stdout.split()
    assert int(trainable) == 2 * (4096 * 4096 + 4096 * 4096)  # q_proj and v_proj: A (r x 4096) + B (4096 x r)
    assert devices == "meta"
    assert int(grown) < 32 * 2**20, f"add_lora grew the resident peak by {int(grown) / 2**20:.0f} MiB"


def test_lora_rank_is_at_most_the_hidden_size() -> None:
    from transformers import GPT2Config

    from memguard.estimation.models import add_lora, lora_rank_limit

    base = load_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert lora_rank_limit(base) == 32
    assert add_lora(base, 32).name == "GPT2Config+lora32"
    base = load_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match=r"lora_rank=33 is above the hidden size of GPT2Config \(32\)"):
        add_lora(base, 33)


def test_architectures_take_model_classes_only() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, architectures=["GPT2Model"])
    assert type(load_model(config).module) is GPT2Model
    config.architectures = ["NoSuchModelOfRemoteCode", "GPT2LMHeadModel"]  # an unknown name is passed over
    assert type(load_model(config).module) is GPT2LMHeadModel
    for name in ("Trainer", "AutoModelForCausalLM", "PreTrainedModel.__init__", "__builtins__"):
        config.architectures = [name]
        if name.isidentifier() and not name.startswith("_"):
            with pytest.raises(ConfigError, match=f"architectures names '{name}', which is not a model class"):
                load_model(config)
        else:  # not a name transformers exports: passed over, the auto class builds
            assert type(load_model(config).module) is GPT2LMHeadModel
