"""kv, visibility: which positions each layer's query sees, read from the export itself.

The plain export holds each layer's rule in its mask (causal, a sliding window, …). The kv pass
rebuilds the mask from ``position_ids`` over the cache, so it must know the rule: it evaluates
the mask subgraph of every attention site on probe positions (:mod:`.probe`) and recognises
the pattern:

- ``causal``: key k is visible to query q iff k <= q;
- ``window w``: iff q - w < k <= q (Mistral, Gemma-2/3 local layers);
- ``chunked c``: iff k <= q and both lie in the same block of c positions, k // c == q // c
  (Llama-4's chunked-attention layers);
- anything else is ``other`` and the pass refuses the layer, naming what query sees what.

A window or chunk only shows within the probe, so the probe spans ``ctx_len + 1`` positions (at most
:data:`~qeff.passes.kv.probe.MAX_PROBE`): a wider one never hides a cache slot and is causal
for the cache.
"""

from __future__ import annotations

__all__ = ["Visibility", "probe_visibility"]

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qeff.passes.kv.probe import evaluate_alone

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Visibility:
    kind: str  # "causal", "window", "chunked" or "other"
    window: int | None = None
    detail: str = ""
    chunk: int | None = None

    def __str__(self) -> str:
        if self.kind == "window":
            return f"sliding window {self.window}"
        if self.kind == "chunked":
            return f"chunked attention {self.chunk}"
        return self.kind if self.kind != "other" else f"other ({self.detail})"


def classify(visible: np.ndarray) -> Visibility:
    """The rule of an ``[L, L]`` query × key visibility matrix."""
    n = visible.shape[0]
    q, k = np.indices((n, n))
    causal = k <= q
    if np.array_equal(visible, causal):
        return Visibility("causal")
    w = int(visible[-1].sum())
    if 0 < w < n and np.array_equal(visible, causal & (k > q - w)):
        return Visibility("window", w)
    c = int(np.argmin(visible[:, 0]))  # the first query that no longer sees key 0 starts chunk 2
    if 0 < c < n and np.array_equal(visible, causal & (k // c == q // c)):
        return Visibility("chunked", chunk=c)
    row = int(np.argmax((visible != causal).any(axis=1)))
    seen = np.flatnonzero(visible[row])
    shown = ", ".join(map(str, seen[:8])) + (", …" if len(seen) > 8 else "")
    return Visibility("other", detail=f"query {row} sees keys [{shown}]")


def _site_visibility(site, value: np.ndarray, length: int) -> np.ndarray | None:
    """The [L, L] visibility a site's mask value gives (batch 0, head 0)."""
    from qeff.passes.kv.match import _reaches_matmul  # the matcher's own test of the score path

    node = site.mask_node
    if value.ndim < 2 or value.shape[-2:] != (length, length):
        return None
    value = value.reshape(-1, length, length)[0]
    if node is not None and node.op_type == "Where" and node.inputs[0] is site.mask:
        # masked_fill: the query sees where the select takes the branch that carries the scores
        cond = value.astype(bool)
        return cond if _reaches_matmul(node.inputs[1]) else ~cond
    if value.dtype == np.bool_:
        return value
    return value > -1.0  # additive: 0 where visible, a large negative number where not


def probe_visibility(model: ir.Model, sites: Sequence, length: int) -> dict[int, Visibility] | None:
    """Each site's rule (by layer), or None when the masks cannot be evaluated alone (a mask
    input other than the step's, no mask at all); the caller then keeps the causal rule."""
    masked = [s for s in sites if s.mask is not None]
    if not masked or len(masked) != len(sites):
        return None
    values = evaluate_alone(model, [s.mask for s in masked], length, "the attention masks")
    if values is None:
        return None
    rules: dict[int, Visibility] = {}
    for s in sites:
        visible = _site_visibility(s, values[id(s.mask)], length)
        if visible is None:
            logger.info("kv: layer %d's mask has shape %s, not [.., %d, %d]; keeping the causal rule",
                        s.layer, values[id(s.mask)].shape, length, length)
            return None
        rules[s.layer] = classify(visible)
    return rules
