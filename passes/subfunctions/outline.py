"""Building one function per layer kind and replacing each layer by a call.

Rules:

1. A kind is a set of layers with equal forms (:mod:`.signature`). Its first layer's nodes
   become the function body; the other layers' nodes are removed.
2. An input slot whose value is a small constant equal in every layer of the kind becomes a
   ``Constant`` node in the body; every other slot is a formal input, in slot order, and each
   call passes its own layer's value.
3. The region's outputs are the function's outputs, in form order. Each call's outputs take
   the names, types and shapes of the values they replace, so graph outputs (the retained KV
   states) keep their names.
4. Constants and initializers that only the removed layers read are removed with them.
"""

from __future__ import annotations

__all__ = ["Kind", "plan_kind", "outline_kind", "remove_unused_constants", "DOMAIN"]

import dataclasses

import numpy as np
import onnx_ir as ir

from qeff.passes.subfunctions.regions import LAYER_RE
from qeff.passes.subfunctions.signature import RegionForm, const_content, small_const

DOMAIN = "qeff.subfunctions"


@dataclasses.dataclass
class Kind:
    name: str
    forms: list[RegionForm]
    inline: dict[int, ir.TensorProtocol]  # slot -> the constant kept inside the body
    formal: list[int]  # slots passed by each call, in order

    @property
    def layers(self) -> list[int]:
        return [f.layer for f in self.forms]


def _same_tensor(tensors: list[ir.TensorProtocol | None]) -> bool:
    first = tensors[0]
    if any(t is None for t in tensors):
        return False
    return all(t.dtype == first.dtype and tuple(t.shape) == tuple(first.shape) and t.tobytes() == first.tobytes()
               for t in tensors[1:])


def plan_kind(name: str, forms: list[RegionForm]) -> Kind:
    """Which slots stay inside the body and which are formal inputs."""
    inline: dict[int, ir.TensorProtocol] = {}
    formal: list[int] = []
    for slot in range(len(forms[0].slots)):
        tensors = [f.slot_consts[slot] for f in forms]
        if _same_tensor(tensors):
            inline[slot] = tensors[0]
        else:
            formal.append(slot)
    return Kind(name, forms, inline, formal)


def _neutral(name: str | None, fallback: str) -> str:
    """A value name without its layer index (``layers.N``)."""
    if not name:
        return fallback
    return LAYER_RE.sub(lambda m: m.group(0).replace(m.group(1), "N") if m.group(1) else m.group(0), name)


def outline_kind(model: ir.Model, kind: Kind, replaced: dict[int, ir.Value]) -> ir.Function:
    """Build ``kind``'s function, replace each of its layers by a call, return the function.

    ``replaced`` maps (by id) each value a call has taken over to the call's output; it is
    shared between kinds, since a layer may read a value an earlier call replaced."""
    graph = model.graph
    rep = kind.forms[0]
    names: set[str] = set()

    def unique(base: str) -> str:
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    formals = []
    for slot in kind.formal:
        actual = rep.slots[slot]
        formals.append(ir.Value(name=unique(_neutral(actual.name, f"arg{slot}")), type=actual.type,
                                shape=actual.shape))
    constants = []
    body_value: dict[int, ir.Value] = dict(zip(kind.formal, formals))
    for slot, tensor in kind.inline.items():
        node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(tensor.numpy()))},
                       name=unique(f"const_{slot}"))
        node.outputs[0].name = node.name
        constants.append(node)
        body_value[slot] = node.outputs[0]

    for form in kind.forms:
        _replace_by_call(graph, form, kind, replaced)

    # The first layer's nodes, now out of the main graph, read the body's values instead.
    slot_of = {id(v): s for s, v in enumerate(rep.slots)}
    slot_of.update({id(replaced[id(v)]): s for s, v in enumerate(rep.slots) if id(v) in replaced})
    members = set(rep.nodes)
    for node in rep.nodes:
        for i, value in enumerate(node.inputs):
            if value is not None and value.producer() not in members:
                node.replace_input_with(i, body_value[_slot_for(rep, value, slot_of)])
    outputs = [rep.nodes[i].outputs[j] for i, j in rep.outputs]
    body = ir.Graph(formals, outputs, nodes=[*constants, *rep.nodes], opset_imports=dict(model.opset_imports),
                    name=kind.name)
    return ir.Function(DOMAIN, kind.name, graph=body, attributes=[])


def _slot_for(form: RegionForm, value: ir.Value, slot_of: dict[int, int]) -> int:
    """The slot a region input is read through (integer constants are keyed by content)."""
    if id(value) in slot_of:
        return slot_of[id(value)]
    tensor = small_const(value)
    for s, const in enumerate(form.slot_consts):
        if tensor is not None and const is not None and const_content(const) == const_content(tensor):
            return s
    raise AssertionError(f"value {value.name!r} is no slot of layer {form.layer}")


def _replace_by_call(graph: ir.Graph, form: RegionForm, kind: Kind, replaced: dict[int, ir.Value]) -> None:
    members = set(form.nodes)
    args = [replaced.get(id(form.slots[s]), form.slots[s]) for s in kind.formal]
    call = ir.node(kind.name, args, domain=DOMAIN, num_outputs=len(form.outputs),
                   name=f"/layers.{form.layer}/{kind.name}")
    for (i, j), new in zip(form.outputs, call.outputs):
        old = form.nodes[i].outputs[j]
        new.name, new.type, new.shape = old.name, old.type, old.shape
        replaced[id(old)] = new
        for use in list(old.uses()):
            if use.node not in members:
                use.node.replace_input_with(use.idx, new)
        for k, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[k] = new
        if form is kind.forms[0]:
            old.name = f"{old.name}__body" if old.name else None
    graph.insert_after(form.nodes[-1], call)
    graph.remove(form.nodes, safe=form is not kind.forms[0])


def remove_unused_constants(graph: ir.Graph, candidates: list[ir.Value]) -> int:
    """Remove the initializers and ``Constant`` nodes among ``candidates`` nothing reads any more."""
    removed = 0
    outputs = {id(v) for v in graph.outputs}
    inputs = {id(v) for v in graph.inputs}
    for value in {id(v): v for v in candidates}.values():
        if value.uses() or id(value) in outputs or id(value) in inputs:
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
            removed += 1
        elif value.is_initializer() and value.name in graph.initializers:
            del graph.initializers[value.name]
            removed += 1
    return removed
