"""fixed: bind specialization symbols to sizes and fold the shape arithmetic that follows (DESIGN §3.2).

This is the bound form of the pass: every symbol given as an option becomes that size on the
graph's inputs and outputs, shapes are re-inferred, and ``fold`` turns the ``Shape``
arithmetic that now has constant answers into constants. With every symbol bound the graph is
fully static, which is what an ahead-of-time compiler takes for one specialization.
"""

from __future__ import annotations

__all__ = ["FixedPass", "FixedOptions"]

import collections
import dataclasses
import logging
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from qeff.errors import PassOptionError
from qeff.passes.base import QeffPass
from qeff.passes.fold import FoldOptions, FoldPass

logger = logging.getLogger(__name__)

# Enough for every shape vector and position table of a real model, small enough that no
# weight-sized tensor is ever materialised by folding.
_FOLD_LIMIT = 1 << 16
_MAX_ROUNDS = 4


def _size(help_text: str):
    return dataclasses.field(default=None, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class FixedOptions:
    batch_size: int | None = _size("bind the batch_size symbol (also binds a plain export's 'batch')")
    seq_len: int | None = _size("bind the seq_len symbol (also binds a plain export's 'seq')")
    ctx_len: int | None = _size("bind the ctx_len symbol (cache length)")
    full_batch_size: int | None = _size("bind the full_batch_size symbol (continuous batching)")


_ALIASES = {"batch_size": ("batch_size", "batch"), "seq_len": ("seq_len", "seq")}


class FixedPass(QeffPass):
    """Bind specialization symbols and fold the shape arithmetic they decide.

    Rules:
    1. Each given option replaces its symbol (and the plain-export alias: ``batch`` for
       ``batch_size``, ``seq`` for ``seq_len``) by its size on every graph input and output.
    2. Shapes are inferred afresh (stale intermediate shapes are dropped first), then
       ``fold`` evaluates what became constant; the two alternate until nothing changes.
    3. With every symbol of the interface bound, no ``Shape`` op may remain and every value
       must have a concrete shape; what does not is listed in the report.
    4. A binding for a symbol the model does not use is an error (a typo would otherwise pass
       silently), as is a size below 1.
    """

    name = "fixed"
    summary = "bind specialization symbols (batch_size, seq_len, ctx_len, …) and fold the shape arithmetic"
    Options = FixedOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        bindings = self._bindings(graph)
        if not bindings:
            raise PassOptionError(
                "fixed needs at least one symbol to bind",
                "e.g. fixed:batch_size=1,seq_len=1,ctx_len=128 (symbolic-only mode is not available yet)",
            )
        before = collections.Counter(n.op_type for n in graph)
        for value in (*graph.inputs, *graph.outputs):
            if value.shape is not None:
                value.shape = ir.Shape([_bind(d, bindings) for d in value.shape])
        boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for out in node.outputs:
                if id(out) not in boundary:
                    out.shape = None  # inferred afresh from the bound inputs
        for _ in range(_MAX_ROUNDS):
            ShapeInferencePass(strict_mode=False)(model)
            folded = FoldPass(FoldOptions(max_elements=_FOLD_LIMIT, infer_shapes=False))(model).modified
            if not folded:
                break
        ShapeInferencePass(strict_mode=False)(model)

        after = collections.Counter(n.op_type for n in graph)
        removed = {op: before[op] - after[op] for op in before if before[op] > after[op]}
        symbolic = [
            out.name for node in graph for out in node.outputs
            if out.shape is None or any(not isinstance(d, int) for d in out.shape)
        ]
        remaining = sorted({d.value for v in graph.inputs if v.shape is not None
                            for d in v.shape if not isinstance(d, int)} - {None})
        self.details = {"bound": dict(bindings), "ops_removed": removed}
        if remaining:
            self.details["symbols_left"] = remaining
        if symbolic and not remaining:
            self.details["values_not_static"] = symbolic[:20]
            logger.warning("fixed: %d values still lack a static shape, e.g. %s", len(symbolic), symbolic[:3])
        return ir.passes.PassResult(model, True)

    def _bindings(self, graph: ir.Graph) -> dict[str, int]:
        used = {d.value for v in (*graph.inputs, *graph.outputs) if v.shape is not None
                for d in v.shape if not isinstance(d, int)}
        bindings: dict[str, int] = {}
        for field in dataclasses.fields(self.options):
            size = getattr(self.options, field.name)
            if size is None:
                continue
            if size < 1:
                raise PassOptionError(f"fixed: {field.name}={size} must be at least 1")
            names = [n for n in _ALIASES.get(field.name, (field.name,)) if n in used]
            if not names:
                raise PassOptionError(
                    f"fixed: the model has no {field.name!r} dimension to bind",
                    f"its symbolic dims are: {', '.join(sorted(x for x in used if x)) or 'none'}",
                )
            for n in names:
                bindings[n] = size
        return bindings

    def update_manifest(self, manifest: dict[str, Any], model: ir.Model) -> None:
        manifest["fixed"] = dict(self.details.get("bound", {}))


def _bind(dim, bindings: dict[str, int]):
    if isinstance(dim, int) or dim.value not in bindings:
        return dim
    return bindings[dim.value]
