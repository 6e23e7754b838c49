"""Small graph edits the passes share."""

from __future__ import annotations

__all__ = ["add_initializer", "reroute_uses"]

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` named ``name`` and return its value."""
    array = np.asarray(array)
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
