"""kv, step positions: values the export derived from token positions it counted itself.

A plain export processes a whole sequence from position 0, so a model may count positions
with ``arange(seq_len)`` instead of reading ``position_ids`` (Llama-4 scales the queries of its
NoPE layers by ``1 + a·log(1 + floor((pos + 1) / f))`` of such positions). In the KV model each
step starts where the last one ended, so those positions restart at 0 every step: the value
is right only if it is the same at every position the cache can hold.

Rules:
1. A ``Range`` the rewritten graph still runs, whose bounds are not all constants, is followed
   forward through elementwise ops with constant other operands. Where the chain turns into
   floating-point data that meets anything else (the query, a table lookup), that value is
   evaluated on positions ``0 … ctx_len-1``.
2. A value that is the same at all of them is kept: the model computes it at any step.
3. One that changes is refused, naming the layer, the Range, and the first position where it
   changes (a ``ctx_len`` at most that position keeps it constant).

Integer uses of such a Range (token indices of an MoE dispatch) are not positions and are not
examined.
"""

from __future__ import annotations

__all__ = ["check_step_positions"]

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qeff.errors import UnsupportedGraphError
from qeff.passes.ir.constants import const_array
from qeff.passes.kv.probe import evaluate_alone

logger = logging.getLogger(__name__)

_ELEMENTWISE = {"Cast", "Add", "Sub", "Mul", "Div", "Floor", "Ceil", "Log", "Exp", "Sqrt", "Neg", "Abs", "Pow",
                "Reciprocal", "Identity", "Softplus"}
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _is_const(v: ir.Value | None) -> bool:
    return v is None or const_array(v, max_elements=64) is not None


def _float_frontier(start: ir.Value, live: set[ir.Node]) -> list[ir.Value]:
    """Floating-point values computed from ``start`` by elementwise ops with constant other
    operands that are read by anything else."""
    frontier, stack, seen = [], [start], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        leaves = False
        for use in v.uses():
            node = use.node
            if node not in live:
                continue
            if node.op_type in _ELEMENTWISE and all(_is_const(x) for i, x in enumerate(node.inputs) if i != use.idx):
                stack.extend(node.outputs)
            else:
                leaves = True
        if leaves and v.dtype in _FLOATS:
            frontier.append(v)
    return frontier


def check_step_positions(model: ir.Model, live: Iterable[ir.Node], ctx_len: int, layer_of) -> None:
    """Refuse (UnsupportedGraphError) a value counted from the step's own positions that is
    not the same at every cache position; see the module's rules."""
    live = set(live)
    for node in model.graph:
        if node not in live or node.op_type != "Range" or all(_is_const(x) for x in node.inputs):
            continue
        positions = node.outputs[0]
        frontier = _float_frontier(positions, live)
        if not frontier:
            continue
        dtype = positions.dtype.numpy() if positions.dtype is not None else np.int64
        values = evaluate_alone(model, frontier, ctx_len, "values counted from the step's positions",
                                given={positions: np.arange(ctx_len).astype(dtype)})
        layer = layer_of(node)
        where = f"layer {layer}" if layer is not None else "the model"
        if values is None:
            raise UnsupportedGraphError(
                f"kv: {where} computes {frontier[0].name} from positions it counts itself (Range {node.name!r}) "
                "and that value could not be evaluated",
                "export the model so that it reads position_ids")
        for value in frontier:
            array = values[id(value)].reshape(ctx_len, -1) if values[id(value)].size % ctx_len == 0 else None
            if array is None or array.shape[0] != ctx_len:
                raise UnsupportedGraphError(
                    f"kv: {where} computes {value.name} of shape {list(values[id(value)].shape)} from positions it "
                    f"counts itself (Range {node.name!r}), not one value per position",
                    "export the model so that it reads position_ids")
            changed = np.flatnonzero((array != array[:1]).any(axis=1))
            if changed.size:
                first = int(changed[0])
                raise UnsupportedGraphError(
                    f"kv: {where} computes {value.name} from positions it counts from the start of each step "
                    f"(Range {node.name!r}), not from position_ids, and it changes at position {first}: "
                    "in the KV model every step would restart it",
                    f"use ctx_len <= {first}, where it is the same at every position")
            logger.info("kv: %s: %s is counted from the step's positions but the same at all %d of them",
                        where, value.name, ctx_len)
