"""transformers' packed-sequence check during a trace (memguard.estimation.trace.packing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers.masking_utils as masking
from transformers import LlamaConfig, LlamaForCausalLM

import memguard
from memguard.errors import TraceError
from memguard.estimation.trace.packing import has_position_ids

B, T = 2, 256


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMGUARD_IN_PROCESS", "1")


def _model() -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=T)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def _trace(model: Any, **kwargs: Any) -> memguard.MemoryEstimate:
    ids = torch.zeros(B, T, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids, **kwargs}
    return memguard.estimate(model, example_input=batch, precision="bf16-mixed", gradient_checkpointing=True,
                             device="cuda", method="trace")


def test_derived_positions_trace_as_not_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    derived = _trace(model)
    # The batch's own (here consecutive) position_ids have no values in the trace: transformers'
    # packed assumption stands (an explicit mask, GQA's K/V repeated), as before the fix.
    given = _trace(model, position_ids=torch.arange(T).expand(B, T))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    not_packed = _trace(model)
    assert derived.peak_bytes == not_packed.peak_bytes
    assert derived.breakdown == not_packed.breakdown
    assert derived.peak_bytes < given.peak_bytes
    assert not any("packed" in n for n in derived.notes)
    assert any("assumed packed sequences" in n and "position_ids" in n for n in given.notes)


def test_the_check_is_transformers_own_after_a_trace_and_after_a_failing_one() -> None:
    original = masking.find_packed_sequence_indices
    model = _model()
    _trace(model)
    assert masking.find_packed_sequence_indices is original

    def failing(output: Any, batch: Any) -> torch.Tensor:
        raise RuntimeError("loss failed")

    ids = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(TraceError, match="loss failed"):
        memguard.estimate(model, example_input={"input_ids": ids}, loss_fn=failing, gradient_checkpointing=True,
                          device="cuda", method="trace")
    assert masking.find_packed_sequence_indices is original
    # Outside a trace, on real tensors, transformers' own answer: packed rows found, consecutive ones not.
    assert masking.find_packed_sequence_indices(torch.arange(4).expand(2, 4)) is None
    assert masking.find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1]])).tolist() == [[0, 0, 1, 1]]


def test_position_ids_are_found_in_nested_batches() -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert has_position_ids(((), {"input_ids": ids, "position_ids": ids}))
    assert has_position_ids((({"batch": {"position_ids": ids}},), {}))
    assert not has_position_ids(((ids,), {"input_ids": ids, "position_ids": None}))
