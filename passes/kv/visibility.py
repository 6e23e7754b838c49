"""kv, visibility: which positions each layer's query sees, read from the export itself.

The plain export holds each layer's rule in its mask (causal, a sliding window, …). The kv pass
rebuilds the mask from ``position_ids`` over the cache, so it must know the rule: it evaluates
the mask subgraph of every attention site on probe positions (``input_ids`` of zeros, an
``attention_mask`` of ones, ``position_ids`` 0…L-1; no weight is multiplied: large initializers
the subgraph reads, an embedding read for its shape, are cut to their first row) and recognises
the pattern:

- ``causal``: key k is visible to query q iff k <= q;
- ``window w``: iff q - w < k <= q (Mistral, Gemma-2/3 local layers);
- anything else is ``other`` and the pass refuses the layer, naming what query sees what.

A window only shows within the probe, so the probe spans ``ctx_len + 1`` positions (at most
:data:`MAX_PROBE`): a wider window never hides a cache slot and is causal for the cache.
"""

from __future__ import annotations

__all__ = ["Visibility", "probe_visibility", "MAX_PROBE"]

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qeff.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from qeff.passes.ir.traversal import needed_nodes

logger = logging.getLogger(__name__)

MAX_PROBE = 2048
_BIG = 1 << 16  # initializers with more elements are cut to their first row for the probe


@dataclasses.dataclass(frozen=True)
class Visibility:
    kind: str  # "causal", "window" or "other"
    window: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "window":
            return f"sliding window {self.window}"
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
    import onnx

    from qeff.common.onnxrt import onnxruntime_session

    graph = model.graph
    masked = [s for s in sites if s.mask is not None]
    if not masked or len(masked) != len(sites):
        return None
    roots = list({id(s.mask): s.mask for s in masked}.values())
    nodes = needed_nodes(graph, roots)
    produced = {id(o) for n in nodes for o in n.outputs}
    feeds: dict[str, np.ndarray] = {}
    initializers = []
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in produced or v.name in feeds:
                continue
            if v.const_value is not None:
                array = v.const_value.numpy()
                if array.size > _BIG and array.ndim >= 1:
                    array = array[:1]
                # (np.ascontiguousarray would turn a scalar into a 1-element vector)
                initializers.append(onnx.numpy_helper.from_array(np.array(array, order="C"), v.name))
                feeds[v.name] = None  # marks it as handled
            elif v.name == INPUT_IDS:
                feeds[v.name] = np.zeros((1, length), np.int64)
            elif v.name == POSITION_IDS:
                feeds[v.name] = np.arange(length, dtype=np.int64)[None]
            elif v.name == ATTENTION_MASK:
                dtype = v.dtype.numpy() if v.dtype is not None else np.int64
                feeds[v.name] = np.ones((1, length), dtype)
            else:
                logger.info("kv: not probing the masks: they read %s", v.name)
                return None
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items() if a is not None]
    ordered = [n for n in graph if n in nodes]
    proto_nodes = [ir.serde.serialize_node(n) for n in ordered]
    outputs = [onnx.helper.make_empty_tensor_value_info(r.name) for r in roots]
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(proto_nodes, "visibility_probe", inputs, outputs, initializers),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version)
    try:
        session = onnxruntime_session(probe.SerializeToString(), purpose=" to read the attention masks")
        values = session.run([r.name for r in roots], {k: a for k, a in feeds.items() if a is not None})
    except Exception as e:  # the probe is best effort: a graph it cannot cut keeps the causal rule
        logger.info("kv: the mask probe failed (%s); keeping the causal rule", str(e).splitlines()[0][:200])
        return None
    by_root = dict(zip((id(r) for r in roots), values))
    rules: dict[int, Visibility] = {}
    for s in sites:
        visible = _site_visibility(s, by_root[id(s.mask)], length)
        if visible is None:
            logger.info("kv: layer %d's mask has shape %s, not [.., %d, %d]; keeping the causal rule",
                        s.layer, by_root[id(s.mask)].shape, length, length)
            return None
        rules[s.layer] = classify(visible)
    return rules
