"""Graph walks the passes share: data ancestry with stop sets, and what a set of outputs needs.

``Shape`` and ``Size`` outputs carry a tensor's shape, not its values, so a walk that asks
"does this value derive from that one" stops there by default: a mask built as
``Expand(sentinel, Shape(scores))`` does not derive from the scores.
"""

from __future__ import annotations

__all__ = ["SHAPE_OPS", "ancestors", "ancestor_nodes", "needed_nodes"]

from collections.abc import Callable, Iterable, Iterator, Sequence

import networkx as nx
import onnx_ir as ir

# Ops whose output depends on their input's shape only.
SHAPE_OPS = frozenset({"Shape", "Size"})


def ancestors(value: ir.Value, *, stop_ops: Iterable[str] = SHAPE_OPS, limit: int | None = None) -> Iterator[ir.Value]:
    """``value`` and the values it is computed from, depth first, not through ``stop_ops``
    (their inputs are not visited); at most ``limit`` values."""
    stop = frozenset(stop_ops)
    seen: set[int] = set()
    stack = [value]
    while stack and (limit is None or len(seen) < limit):
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        p = x.producer()
        if p is not None and p.op_type not in stop:
            stack.extend(i for i in p.inputs if i is not None)


def ancestor_nodes(value: ir.Value, *, stop_ops: Iterable[str] = SHAPE_OPS,
                   limit: int | None = None) -> Iterator[ir.Node]:
    """The producers of :func:`ancestors` (a stop op itself is yielded, its inputs are not)."""
    for x in ancestors(value, stop_ops=stop_ops, limit=limit):
        if x.producer() is not None:
            yield x.producer()


def needed_nodes(graph: ir.Graph, roots: Sequence[ir.Value],
                 inputs_of: Callable[[ir.Node], Sequence[ir.Value | None]] | None = None) -> set[ir.Node]:
    """The nodes ``roots`` are computed from, when each node reads ``inputs_of(node)`` (default:
    its own inputs; a rewrite that will replace a node passes what the replacement reads).
    Values captured by a node's subgraphs count as its inputs."""
    inputs_of = inputs_of or (lambda node: node.inputs)
    deps = nx.DiGraph()
    for node in graph:
        deps.add_node(node)
        for v in _reads(node, inputs_of):
            if v is not None and v.producer() is not None:
                deps.add_edge(v.producer(), node)
    needed: set[ir.Node] = set()
    for root in roots:
        producer = root.producer() if root is not None else None
        if producer is not None and producer in deps and producer not in needed:
            needed.add(producer)
            needed |= nx.ancestors(deps, producer)
    return needed


def _reads(node: ir.Node, inputs_of: Callable[[ir.Node], Sequence[ir.Value | None]]) -> Iterator[ir.Value | None]:
    yield from inputs_of(node)
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            for inner in attr.value:
                yield from inner.inputs
