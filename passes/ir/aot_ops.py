"""Fixed-shape replacements for ops that ahead-of-time compilers reject in plain exports.

Each rule has a pattern (the op), a check (what it needs to know) and a rewrite with identical
numerics. A node the check refuses is left as it was, and the reason is logged.

Rules:
- ``Trilu(x, k)``: the Cloud AI compiler rejects it in plain Hugging Face exports ("Diagonal
  must be scalar", the causal mask of older transformers). It becomes
  ``Where(col - row >= k, x, 0)`` (``<= k`` for the lower triangle) with ``row``/``col`` from
  ``Range`` over ``x``'s last two dims; once those dims are fixed, ``fold`` turns the
  comparison into a constant mask.
"""

from __future__ import annotations

__all__ = ["replace_rejected_ops"]

import collections
import logging

import numpy as np
import onnx_ir as ir

from qeff.passes.ir.builder import add_initializer

logger = logging.getLogger(__name__)


def _check_trilu(node: ir.Node) -> str | None:
    x = node.inputs[0]
    if x.dtype is None:
        return "its input has no known element type"
    if x.shape is not None and len(x.shape) < 2:
        return "its input has rank below 2"
    return None


def _rewrite_trilu(graph: ir.Graph, node: ir.Node, base: str) -> None:
    x = node.inputs[0]
    k = node.inputs[1] if len(node.inputs) > 1 else None
    new: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], label: str, **attributes: object) -> ir.Value:
        n = ir.node(op, inputs, attributes=attributes, name=f"{base}/{label}")
        n.outputs[0].name = f"{base}/{label}"
        new.append(n)
        return n.outputs[0]

    def const(label: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}/{label}", array)

    zero, one = const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64))
    axis0 = const("axis0", np.array([0], np.int64))
    rows = add("Squeeze", [add("Shape", [x], "rows_1d", start=-2, end=-1), axis0], "rows")
    cols = add("Squeeze", [add("Shape", [x], "cols_1d", start=-1), axis0], "cols")
    row = add("Unsqueeze", [add("Range", [zero, rows, one], "row_range"), const("axis1", np.array([1], np.int64))], "row")
    col = add("Range", [zero, cols, one], "col")
    offset = add("Sub", [col, row], "offset")
    diagonal = zero if k is None else add("Reshape", [k, const("scalar", np.array([], np.int64))], "diagonal")
    upper = node.attributes.get_int("upper", 1)
    keep = add("GreaterOrEqual" if upper else "LessOrEqual", [offset, diagonal], "keep")
    fill = const("fill", np.zeros((), dtype=x.dtype.numpy()))
    result = add("Where", [keep, x, fill], "select")
    graph.insert_before(node, new)
    old = node.outputs[0]
    result.dtype, result.shape = x.dtype, x.shape
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if result in graph.outputs:
        result.name = old.name  # the interface keeps its output name


_RULES = {"Trilu": (_check_trilu, _rewrite_trilu)}


def replace_rejected_ops(graph: ir.Graph) -> collections.Counter:
    """Apply every rule to ``graph`` (not subgraphs); returns how many nodes each replaced."""
    replaced: collections.Counter = collections.Counter()
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _RULES:
            continue
        check, rewrite = _RULES[node.op_type]
        reason = check(node)
        if reason is not None:
            logger.warning("fixed: %s %r kept: %s", node.op_type, node.name, reason)
            continue
        rewrite(graph, node, f"qeff_fixed/{node.op_type}_{sum(replaced.values())}")
        replaced[node.op_type] += 1
    return replaced
