"""transformers' packed-sequence check, answered during a trace as the real run answers it.

Without an attention mask and without a cache (training; gradient checkpointing sets
``use_cache=False``), transformers 5's ``masking_utils._preprocess_mask_arguments`` asks
``find_packed_sequence_indices(position_ids)`` whether several sequences are packed into one row
(positions that do not rise by 1). A ``None`` answer ("not packed") lets SDPA run ``is_causal``
without a mask; any other answer makes ``sdpa_mask`` build an explicit boolean mask, and with a
mask the SDPA integration repeats grouped-query K/V heads (``integrations/sdpa_attention.py``,
``use_gqa_in_sdpa``). The answer needs the values of the positions, so transformers skips it when
``is_tracing(packed_sequence_mask)`` (``utils/import_utils.py``), which is true for a FakeTensor
(``is_fake_tensor``): on fake tensors transformers always assumes packed sequences, a real eager
run with consecutive positions never does.

During a trace, :func:`derived_positions` answers the check as the real run would where the values
are known: when the batch carries no ``position_ids`` (memguard's own batches, and any user batch
without them), the model derives them itself from ``cache_position`` or an ``arange`` of the
sequence (``LlamaModel.forward``: ``position_ids = cache_position.unsqueeze(0)``), consecutive by
construction, so the answer is ``None``. When the batch carries its own ``position_ids`` (possibly
packed), their values are unknown to the trace: transformers' own answer (packed, the explicit
mask: the high side) stands, and is counted for a note.

The patch of ``transformers.masking_utils.find_packed_sequence_indices`` lasts the trace only, is
undone even when the trace fails, and answers for the tracing thread only (another thread of the
user's process calling it meanwhile gets transformers' function). transformers is not imported
here: without ``transformers.masking_utils`` already loaded, no model of the trace uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from torch._subclasses.fake_tensor import is_fake

__all__ = ["Positions", "derived_positions", "has_position_ids"]

_NAME = "find_packed_sequence_indices"


@dataclasses.dataclass
class Positions:
    """What the current batch says about positions, and what the check answered.

    Attributes:
        given: the batch carries its own ``position_ids`` (set per batch by the trace).
        assumed_packed: how many times transformers' packed assumption stood (batches with their
            own ``position_ids``).
    """

    given: bool = False
    assumed_packed: int = 0
    thread: int = dataclasses.field(default_factory=threading.get_ident)

    def note(self) -> str | None:
        """The note on the packed assumption, ``None`` when it never stood."""
        if not self.assumed_packed:
            return None
        return ("the batch's own position_ids have no values in the trace: transformers' packed-sequence "
                f"check (find_packed_sequence_indices x{self.assumed_packed}) assumed packed sequences, "
                "an explicit attention mask (the high side; without packing the real run needs none)")


def has_position_ids(batch: Any) -> bool:
    """Whether ``batch`` (a forward's ``(args, kwargs)``, or anything nesting mappings, lists and
    tuples) has a ``"position_ids"`` entry that is not ``None``."""
    if isinstance(batch, Mapping):
        if batch.get("position_ids") is not None:
            return True
        return any(has_position_ids(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(has_position_ids(v) for v in batch)
    return False


@contextlib.contextmanager
def derived_positions() -> Iterator[Positions]:
    """Answer transformers' packed-sequence check "not packed" for derived positions, for the duration.

    Yields the :class:`Positions` whose :attr:`~Positions.given` the trace sets for each batch.
    """
    positions = Positions()
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, _NAME, None)
    if masking is None or not callable(original):
        yield positions
        return

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        if threading.get_ident() != positions.thread or not is_fake(position_ids):
            return original(position_ids)
        if not positions.given:
            return None  # consecutive by construction: what the real run's check finds
        positions.assumed_packed += 1
        return original(position_ids)

    find_packed_sequence_indices.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(masking, _NAME, find_packed_sequence_indices)
    try:
        yield positions
    finally:
        setattr(masking, _NAME, original)
