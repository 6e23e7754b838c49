"""The node builder and the small graph edits every pass shares.

:class:`GraphBuilder` records new nodes on an ``onnx_ir`` tape with unique, readable names
(``prefix/what_N``) and registers constants as initializers once per distinct value, so the
passes that insert subgraphs (kv, mxint8kv, fixed) all build them the same way.
"""

from __future__ import annotations

__all__ = ["GraphBuilder", "add_initializer", "reroute_uses", "unique_name"]

from typing import Any

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` and return its value. It is named
    ``name`` unless the graph has that name already (a node without a name gives every pass
    the same base name), then ``name_1``, ``name_2``, …"""
    array = np.asarray(array)
    name = unique_name(graph, name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def reroute_uses(value: ir.Value, replacement: ir.Value, reader: ir.Node, index: int) -> None:
    """Make everything that reads ``value`` (graph outputs included) read ``replacement``,
    except input ``index`` of ``reader``: the node inserted after ``value`` that computes
    ``replacement`` from it (a blanket replacement would make it read its own output)."""
    ir.convenience.replace_all_uses_with(value, replacement, replace_graph_outputs=True)
    reader.replace_input_with(index, value)


def unique_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, … : the first no initializer or node output of
    ``graph`` already carries."""
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


class GraphBuilder:
    """Emits nodes into ``tape`` (the caller inserts ``tape.nodes`` where they belong)."""

    def __init__(self, graph: ir.Graph, opset: int, prefix: str) -> None:
        self.graph = graph
        self.opset = opset
        self.prefix = prefix
        self.tape = ir.tape.Tape()
        self._names = 0
        self._consts: dict[tuple, ir.Value] = {}

    def _name(self, what: str) -> str:
        self._names += 1
        return f"{self.prefix}/{what}_{self._names}"

    def op(self, op_type: str, inputs: list[ir.Value | None], attributes: dict[str, Any] | None = None,
           what: str | None = None) -> ir.Value:
        """One node with one output; the output carries the node's name."""
        name = self._name(what or op_type)
        out = self.tape.op(op_type, inputs, attributes, name=name)
        out.name = name
        return out

    def const(self, array: Any, dtype: Any = None) -> ir.Value:
        """An initializer holding ``array`` (one per distinct value, reused)."""
        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = add_initializer(self.graph, self._name("const"), arr)
        return self._consts[key]

    def i64(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def unsqueeze(self, x: ir.Value, *axes: int) -> ir.Value:
        return self.op("Unsqueeze", [x, self.i64(*axes)])

    def reduce_max(self, x: ir.Value, axis: int) -> ir.Value:
        if self.opset >= 18:
            return self.op("ReduceMax", [x, self.i64(axis)], {"keepdims": 1})
        return self.op("ReduceMax", [x], {"axes": [axis], "keepdims": 1})
