"""The family table (memguard/estimation/families.py): each model type once, every family it names laid
out, and the readers (arch, inputs, the formula) answering from it."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
from transformers import BartConfig, Qwen3Config, RobertaConfig

from memguard.errors import UnsupportedModelError
from memguard.estimation.arch import FAMILY_OF_MODEL_TYPE as ARCH_FAMILY_OF_MODEL_TYPE
from memguard.estimation.families import FAMILIES, FAMILY_OF_MODEL_TYPE, MODEL_TYPES, UNLISTED, facts_of
from memguard.estimation.formula.families import refuse_unmodelled
from memguard.estimation.inputs import max_positions

PACKAGE = Path(__file__).resolve().parents[2] / "memguard"


def test_each_model_type_appears_once() -> None:
    twice = [name for name, n in Counter(m.name for m in MODEL_TYPES).items() if n > 1]
    assert twice == []
    assert "" not in {m.name for m in MODEL_TYPES}  # the name of UNLISTED, which facts_of returns for the rest
    assert facts_of("mamba") is UNLISTED


def test_every_family_named_has_a_layout() -> None:
    named = {m.family for m in MODEL_TYPES if m.family}
    assert named | {"torch"} == set(FAMILIES)  # no family without a record, none a record names but lacks
    assert set(FAMILY_OF_MODEL_TYPE.values()) <= set(FAMILIES)
    assert ARCH_FAMILY_OF_MODEL_TYPE is FAMILY_OF_MODEL_TYPE
    for m in MODEL_TYPES:  # a record is laid out by its family, its own layout, or refused with a reason
        assert bool(m.family or m.layout or m.not_modelled) != (m.name in ("albert", "olmo2")), m.name
        assert not (m.layout and m.not_modelled), m.name
        if m.layout is not None:
            assert m.layout.name == m.name


def test_the_family_names_the_formula_and_arch_test_are_in_the_table() -> None:
    """A family name written as a string in arch.py or the formula (``family == "t5"``) is a key of
    FAMILIES: the table holds every family the code names."""
    named: set[str] = set()
    for path in [PACKAGE / "estimation" / "arch.py", *(PACKAGE / "estimation" / "formula").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            sides = (node.left, *node.comparators) if isinstance(node, ast.Compare) else ()
            if any(getattr(side, "id", getattr(side, "attr", None)) == "family" for side in sides):
                for side in sides:
                    for const in ast.walk(side):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            named.add(const.value)
    assert named and named <= set(FAMILIES), named - set(FAMILIES)


def test_the_readers_answer_from_the_table() -> None:
    assert facts_of("qwen3").qk_norm and facts_of("olmo2").qk_norm and not facts_of("llama").qk_norm
    assert facts_of("gpt2").fused_qkv and not facts_of("gpt_neo").fused_qkv
    # RoBERTa's positions start after the padding index: 514 embeddings take 512 tokens
    assert max_positions(RobertaConfig(max_position_embeddings=514)) == 512
    assert max_positions(BartConfig(max_position_embeddings=1024)) is None  # not listed as bounding
    assert max_positions(Qwen3Config()) is None
    with pytest.raises(UnsupportedModelError, match=r"does not model windowed attention .*\(swin\)"):
        refuse_unmodelled("swin")
    refuse_unmodelled("llama")  # modelled: no error
    refuse_unmodelled("")
