"""Example inputs for causal LMs: random tokens in a right-padded batch.

Shared by the exporter (the tracing example) and the checker (the comparison input), so both
exercise the padding-mask path of the model rather than the all-ones shortcut some attention
implementations take.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._deps import require_torch

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["padded_batch"]


def padded_batch(
    batch: int, seq: int, vocab: int, *, pad: int = 2, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Random int64 ``input_ids`` with a right-padded ``attention_mask`` and ``position_ids``.

    Row 0 is full; row ``r`` is shorter by ``pad * r`` tokens (at least one token stays valid).
    Position ids are ``cumsum(mask) - 1`` clipped at 0, the way transformers' ``generate``
    derives them from a mask; pad positions thus repeat the last valid position.
    """
    torch, _ = require_torch()
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    for row in range(1, batch):
        valid = max(1, seq - pad * row)
        attention_mask[row, valid:] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
