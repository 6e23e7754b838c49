"""kv, probing: evaluate parts of the export that depend only on the step's inputs.

What a layer's mask or score bias does is read by running it, not by recognising how an
exporter spelled it: the subgraph that computes the wanted values is cut out and run in
onnxruntime on probe inputs (``input_ids`` of zeros, an ``attention_mask`` of ones,
``position_ids`` 0…L-1, batch 1). No weight is multiplied: a large initializer the subgraph
reads (an embedding read for its shape) is cut to its first row.
"""

from __future__ import annotations

__all__ = ["evaluate_alone", "MAX_PROBE"]

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qeff.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from qeff.passes.ir.traversal import needed_nodes

logger = logging.getLogger(__name__)

MAX_PROBE = 2048  # positions a probe spans at most
_BIG = 1 << 16  # initializers with more elements are cut to their first row for the probe


def _feed(value: ir.Value, length: int) -> np.ndarray | None:
    if value.name == INPUT_IDS:
        return np.zeros((1, length), np.int64)
    if value.name == POSITION_IDS:
        return np.arange(length, dtype=np.int64)[None]
    if value.name == ATTENTION_MASK:
        return np.ones((1, length), value.dtype.numpy() if value.dtype is not None else np.int64)
    return None


def evaluate_alone(model: ir.Model, roots: Sequence[ir.Value], length: int, what: str,
                   given: Mapping[ir.Value, np.ndarray] | None = None) -> dict[int, np.ndarray] | None:
    """The values of ``roots`` (by ``id``) on ``length`` probe positions, or None when they
    read something else than the step's inputs and constants, or the cut graph does not run.
    Values in ``given`` are fed as they are and the graph is cut there."""
    import onnx

    from qeff.common.onnxrt import onnxruntime_session

    graph = model.graph
    given = {id(v): (v, a) for v, a in (given or {}).items()}
    roots = list({id(r): r for r in roots}.values())
    nodes = needed_nodes(graph, roots, lambda n: [v for v in n.inputs if id(v) not in given])
    produced = {id(o) for n in nodes for o in n.outputs if id(o) not in given}
    feeds: dict[str, np.ndarray | None] = {}
    initializers = []
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in produced or v.name in feeds:
                continue
            if id(v) in given:
                feeds[v.name] = given[id(v)][1]
                continue
            if v.const_value is not None:
                array = v.const_value.numpy()
                if array.size > _BIG and array.ndim >= 1:
                    array = array[:1]
                # (np.ascontiguousarray would turn a scalar into a 1-element vector)
                initializers.append(onnx.numpy_helper.from_array(np.array(array, order="C"), v.name))
                feeds[v.name] = None  # marks it as handled
                continue
            feeds[v.name] = _feed(v, length)
            if feeds[v.name] is None:
                logger.info("kv: not probing %s: they read %s", what, v.name)
                return None
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items() if a is not None]
    proto_nodes = [ir.serde.serialize_node(n) for n in graph if n in nodes and not any(id(o) in given for o in n.outputs)]
    outputs = [onnx.helper.make_empty_tensor_value_info(r.name) for r in roots]
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(proto_nodes, "probe", inputs, outputs, initializers),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version)
    try:
        session = onnxruntime_session(probe.SerializeToString(), purpose=f" to read {what}")
        values = session.run([r.name for r in roots], {k: a for k, a in feeds.items() if a is not None})
    except Exception as e:  # best effort: a graph that cannot be cut is decided without the probe
        logger.info("kv: the probe of %s failed (%s)", what, str(e).splitlines()[0][:200])
        return None
    return dict(zip((id(r) for r in roots), values))
