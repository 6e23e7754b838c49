"""kv, score biases: what each layer adds to its attention scores, read from the export.

The rewrite can rebuild one kind of additive score bias over the cache: ALiBi, a per-head
slope times the key's position (softmax ignores what is constant along a row, so a bias of
``slope · (k - q)`` is the same). Two ways to find the slopes, in this order:

1. *Probe* (:mod:`.probe`): evaluate the bias term on probe positions 0…L-1 and check that,
   for every head and every query row, it grows by the same slope per key over the keys that
   row sees (k <= q; masked keys do not count). This reads any spelling of ALiBi: BLOOM's,
   computed from the attention mask's cumulative sum, as well as a constant table.
2. Where the term cannot be evaluated alone (it reads a past-cache input) or not on that many
   positions (MPT's table is sliced by the key length, and the probe runs past its end): a
   constant in its ancestry with a dim of ``n_heads`` that grows linearly along its last axis (MPT's table).

Anything else is not ALiBi and the pass refuses the layer, naming what the probe saw.
"""

from __future__ import annotations

__all__ = ["BiasRule", "classify_bias", "probe_biases", "table_slopes"]

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qeff.passes.ir.constants import const_array, const_tensor
from qeff.passes.ir.traversal import ancestors
from qeff.passes.kv.probe import evaluate_alone

logger = logging.getLogger(__name__)

# |bias - fit| allowed, relative to the largest |bias| difference along a row (float32 noise).
_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class BiasRule:
    slopes: np.ndarray | None  # per head, when the bias is ALiBi
    detail: str = ""  # what was seen instead

    def __str__(self) -> str:
        return "ALiBi" if self.slopes is not None else f"other ({self.detail})"


def classify_bias(value: np.ndarray, n_heads: int, length: int) -> BiasRule:
    """The slopes of a bias evaluated on ``length`` probe positions, batch 1: its last axis is
    the key, one of the others holds ``n_heads`` with only size-1 dims before it, and what
    remains (1 or ``length`` rows) is the query."""
    shape = value.shape
    if not shape or shape[-1] != length:
        return BiasRule(None, f"shape {list(shape)}, not [.., {length} keys]")
    lead = [i for i, d in enumerate(shape[:-1]) if d == n_heads and all(x == 1 for x in shape[:i])]
    if not lead:
        if value.size == length or all(d == 1 for d in shape[:-1]) or (value.size == length * length):
            heads = 1  # the same bias for every head
        else:
            return BiasRule(None, f"shape {list(shape)} has no dim of {n_heads} heads")
    else:
        heads = n_heads
    rows = np.asarray(value, np.float64).reshape(heads, -1, length)
    if rows.shape[1] not in (1, length):
        return BiasRule(None, f"shape {list(shape)}: {rows.shape[1]} query rows for {length} positions")
    keys = np.arange(length)
    last = rows[:, -1, :]  # the last query sees every key
    slopes = (last[:, -1] - last[:, 0]) / max(length - 1, 1)
    for r in range(rows.shape[1]):
        seen = keys <= (r if rows.shape[1] == length else length - 1)
        got = rows[:, r, seen] - rows[:, r, :1]
        want = slopes[:, None] * keys[seen][None, :]
        scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
        bad = np.abs(got - want) > _RTOL * scale
        if bad.any():
            h, k = np.argwhere(bad)[0]
            return BiasRule(None, f"head {h}, query {r if rows.shape[1] == length else length - 1}, key {k}: "
                                  f"{got[h, k] + rows[h, r, 0]:.6g} is not {rows[h, r, 0]:.6g} + {slopes[h]:.6g}·{k}")
    if heads == 1:
        slopes = np.repeat(slopes, n_heads)
    return BiasRule(slopes.astype(np.float64))


def table_slopes(n_heads: int, term: ir.Value) -> np.ndarray | None:
    """Per-head slopes of an ALiBi table in ``term``'s ancestry: a constant with a dim of
    ``n_heads`` that grows linearly along its last axis."""
    for x in ancestors(term, limit=400):
        t = const_tensor(x)
        shape = tuple(t.shape) if t is not None else ()
        if len(shape) < 2 or shape[-1] < 2 or n_heads not in shape:
            continue  # decided from the shape alone: no other constant is read
        arr = const_array(x)
        if arr is None:
            continue
        arr = np.asarray(arr, dtype=np.float64)
        steps = np.diff(arr, axis=-1)
        if not np.allclose(steps, steps[..., :1], rtol=1e-5, atol=1e-6):
            continue
        slopes = steps[..., 0].reshape(-1)
        if slopes.size == n_heads:
            return slopes
    return None


def probe_biases(model: ir.Model, sites: Sequence, length: int) -> dict[int, BiasRule]:
    """Each biased site's rule (by layer): probed, else from a constant table."""
    biased = [s for s in sites if s.bias]
    if not biased:
        return {}
    values = evaluate_alone(model, [s.bias[0] for s in biased], length, "the score biases") or {}
    rules = {}
    for s in biased:
        value = values.get(id(s.bias[0]))
        # A bias without one value per probe key (a table sliced past its end) is read as a table.
        if value is not None and value.ndim and value.shape[-1] == length:
            rules[s.layer] = classify_bias(value, s.n_heads, length)
        else:
            slopes = table_slopes(s.n_heads, s.bias[0])
            rules[s.layer] = BiasRule(slopes, "" if slopes is not None else f"{s.bias[0].name}, not probed")
    return rules
