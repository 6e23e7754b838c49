"""The canonical form of a layer region: two layers are the same kind when their forms are equal.

Rules:

1. Nodes are listed in graph order; each node is written as its domain, op type, attributes
   (tensor attributes by content), the number of its outputs, and for each input either the
   producing node's position and output index inside the region, or an input slot.
2. An input slot is a value from outside the region. Slots are numbered by first use, so the
   same outside value read twice is one slot and the wiring of the slots is part of the form.
3. A small constant slot that is not floating point (a shape, axes, indices) is written with
   its content, and two such constants with the same content are one slot: those stay inside
   the function and must be equal in every layer of a kind. A floating-point constant is
   written with its type and shape only: equal in every layer it stays inside, different it
   becomes an input (a per-layer scale). Any other value (a weight, the hidden state, a mask)
   is an input.
4. The region's outputs (values read outside it or graph outputs) are part of the form, by
   position.
5. A region with a subgraph attribute (``If``, ``Loop``) has no form and stays inline.

Equal forms give the node-for-node correspondence directly (by position), which is an
isomorphism of the two regions' graphs respecting ops, attributes and wiring.
"""

from __future__ import annotations

__all__ = ["RegionForm", "region_form", "small_const", "const_content", "INLINE_LIMIT"]

import collections
import dataclasses
import hashlib
from typing import Any

import onnx_ir as ir

from qeff.passes.ir.constants import const_tensor

# Constants up to this many elements may be kept inside a function body; larger ones (weights)
# are always inputs.
INLINE_LIMIT = 1024


@dataclasses.dataclass
class RegionForm:
    layer: int
    nodes: list[ir.Node]
    slots: list[ir.Value]
    slot_consts: list[ir.TensorProtocol | None]
    outputs: list[tuple[int, int]]
    key: tuple | None
    reason: str = ""

    @property
    def ops(self) -> collections.Counter:
        return collections.Counter(n.op_type for n in self.nodes)


def small_const(value: ir.Value) -> ir.TensorProtocol | None:
    tensor = const_tensor(value)
    if tensor is None or tensor.size > INLINE_LIMIT:
        return None
    return tensor


def const_content(tensor: ir.TensorProtocol) -> tuple:
    digest = hashlib.sha256(tensor.tobytes()).hexdigest()
    return (str(tensor.dtype), tuple(tensor.shape), digest)


def _attr_key(attr: ir.Attr) -> Any:
    value = attr.value
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise _HasSubgraph(attr.name)
    if attr.type == ir.AttributeType.TENSOR:
        return const_content(value)
    if attr.type == ir.AttributeType.TENSORS:
        return tuple(const_content(t) for t in value)
    if isinstance(value, (list, tuple)):
        return tuple(repr(v) for v in value)
    return repr(value)


class _HasSubgraph(Exception):
    pass


def region_form(layer: int, nodes: list[ir.Node], graph_outputs: set[int]) -> RegionForm:
    """The canonical form of the region made of ``nodes`` (in graph order)."""
    index = {node: i for i, node in enumerate(nodes)}
    slots: list[ir.Value] = []
    consts: list[ir.TensorProtocol | None] = []
    slot_of: dict[Any, int] = {}
    entries = []
    try:
        for node in nodes:
            ins = []
            for value in node.inputs:
                if value is None:
                    ins.append(None)
                    continue
                producer = value.producer()
                if producer in index:
                    ins.append(("n", index[producer], value.index()))
                    continue
                tensor = small_const(value)
                structural = tensor is not None and not tensor.dtype.is_floating_point()
                key = ("c", const_content(tensor)) if structural else ("v", id(value))
                if key not in slot_of:
                    slot_of[key] = len(slots)
                    slots.append(value)
                    consts.append(tensor)
                slot = slot_of[key]
                if structural:
                    ins.append(("x", slot, key[1]))
                elif tensor is not None:
                    ins.append(("x", slot, "c", str(tensor.dtype), tuple(tensor.shape)))
                else:
                    ins.append(("x", slot))
            attrs = tuple(sorted((name, _attr_key(attr)) for name, attr in node.attributes.items()))
            entries.append((node.domain, node.op_type, node.overload, attrs, tuple(ins), len(node.outputs)))
    except _HasSubgraph as e:
        return RegionForm(layer, nodes, [], [], [], None, f"has a subgraph attribute ({e})")
    members = set(nodes)
    outputs = [(i, j) for i, node in enumerate(nodes) for j, out in enumerate(node.outputs)
               if id(out) in graph_outputs or any(use.node not in members for use in out.uses())]
    return RegionForm(layer, nodes, slots, consts, outputs, (tuple(entries), tuple(outputs)))
