"""fixed: fixed shapes for ahead-of-time compilers (DESIGN §3.2).

Without bindings the pass is symbolic: every dim of every value becomes a number, a declared
specialization symbol (``batch_size``, ``seq_len``, ``ctx_len``, ``full_batch_size``, plus the
symbols an encoder user names), or an expression of those (``batch_size*seq_len``); each
symbol is read from the graph once and all shape arithmetic is rebuilt from that. Symbols given
a size (``fixed:seq_len=1,batch_size=1``) become that size, and with every symbol bound the
graph is fully static: no ``Shape`` op, every value with a concrete shape. That is what the
compiler takes for one specialization.
"""

from __future__ import annotations

__all__ = ["FixedPass", "FixedOptions"]

import collections
import dataclasses
import difflib
import logging
import re
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qeff.contract import COMP_CTX_LENGTHS, NUM_LOGITS_TO_KEEP
from qeff.errors import PassOptionError, UnsupportedGraphError
from qeff.passes.ir.aot_ops import replace_rejected_ops
from qeff.passes.infra.base import INT32_MAX, QeffPass, QeffPassResult, parse_option_value
from qeff.passes.fold import FoldOptions, FoldPass
from qeff.passes.ir.shape_sharing import PREFIX, share_shape_arithmetic
from qeff.passes.ir.symbolic_shapes import SymbolicShapes

logger = logging.getLogger(__name__)

# Enough for every shape vector and position table of a real model, small enough that no
# weight-sized tensor is ever materialised by folding.
_FOLD_LIMIT = 1 << 16
_MAX_ROUNDS = 4
_DECLARED = ("batch_size", "seq_len", "ctx_len", "full_batch_size")
# Symbols of the decode-time passes' inputs (spec, ccl): kept as symbols, bound with name=size.
_DECODE_TIME = (NUM_LOGITS_TO_KEEP, COMP_CTX_LENGTHS)
# What plain exports call the decoder symbols; renamed to the declared names.
_ALIASES = {"batch": "batch_size", "seq": "seq_len"}
# A sign is let through so that a negative size is refused as a size, not as an unknown option.
_SIZE_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=[-+]?\d+$")


def _size(help_text: str):
    # A dim of 0 would make every tensor empty and hide the model; a dim beyond int32 is not
    # one any runtime allocates.
    return dataclasses.field(default=None, metadata={"help": help_text, "min": 1, "max": INT32_MAX})


@dataclasses.dataclass(frozen=True)
class FixedOptions:
    batch_size: int | None = _size("bind the batch_size symbol (a plain export's 'batch' too)")
    seq_len: int | None = _size("bind the seq_len symbol (a plain export's 'seq' too)")
    ctx_len: int | None = _size("bind the ctx_len symbol (cache length)")
    full_batch_size: int | None = _size("bind the full_batch_size symbol (continuous batching)")
    symbols: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "other symbols to keep, for encoders (e.g. sequence_length); give any "
                          "symbol a size with name=size, e.g. fixed:sequence_length=128"},
    )
    sizes: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "sizes of other symbols as name=size (written as options of their own)"}
    )


class FixedPass(QeffPass):
    """Fix every dim to a number or a specialization symbol, and share or fold the shape arithmetic.

    Rules:
    1. Graph input and output dims named ``batch``/``seq`` (plain exports) are renamed
       ``batch_size``/``seq_len``; each symbol given a size becomes that size. Every remaining
       input dim must be a number or a declared symbol (the four decoder symbols and those
       named with ``symbols=``), otherwise the pass refuses and names the dim.
    2. Ops compilers reject in plain exports are replaced with identical numerics
       (:mod:`qeff.passes.ir.aot_ops`: ``Trilu``).
    3. Every value's dims are derived symbolically (:mod:`qeff.passes.ir.symbolic_shapes`);
       each fully known shape vector leaving the shape arithmetic is rebuilt from one shared
       ``Shape`` slice per symbol (or is a constant), and ``fold`` evaluates what became
       constant; the two alternate until nothing changes.
    4. The derived dims are written to every value (the model's ``value_info``). Values whose
       dims are not numbers or expressions of declared symbols (data-dependent ops such as
       ``NonZero``) are listed in the report; with every symbol bound, so are leftover
       ``Shape`` ops and values without a concrete shape.
    5. A size for a symbol the model does not have is an error (a typo would otherwise pass
       silently), as is a size outside 1..2**31-1 (checked when the pass is built).
    """

    name = "fixed"
    summary = "fix every dim to a number or a specialization symbol; share or fold the shape arithmetic"
    Options = FixedOptions

    @classmethod
    def from_text(cls, text_options: dict[str, str]) -> QeffPass:
        """Options named after no field are sizes of other symbols (``sequence_length=128``)."""
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        known = {k: v for k, v in text_options.items() if k in fields}
        sizes = [f"{k}={v}" for k, v in text_options.items() if k not in fields]
        for item in sizes:
            if not _SIZE_OPTION.match(item):
                return super().from_text(text_options)  # reports the unknown option
        if sizes:
            known["sizes"] = "|".join([*(parse_option_value(known.pop("sizes", ""), tuple[str, ...])), *sizes])
        return super().from_text(known)

    def validate_options(self) -> None:
        """Each ``sizes`` item is ``name=N`` with N in the range of the size fields."""
        for item in self.options.sizes:
            _parse_size(item)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        bindings, symbols = self._resolve_symbols(graph)
        interface = self._interface_shapes(graph, bindings, symbols)  # refuses before any change
        graph.sort()
        for value, shape in interface.items():
            value.shape = shape
        _forget_inner_shapes(graph)
        ShapeInferencePass(strict_mode=False)(model)  # element types of every value
        replaced = replace_rejected_ops(graph)
        if replaced:
            ShapeInferencePass(strict_mode=False)(model)  # and of the replacements
        shared = 0
        for _ in range(_MAX_ROUNDS):
            shapes = SymbolicShapes(model, symbols).run()
            shapes.apply()
            rebuilt = share_shape_arithmetic(model, shapes)
            if rebuilt:
                RemoveUnusedNodesPass()(model)
            folded = FoldPass(FoldOptions(max_elements=_FOLD_LIMIT, infer_shapes=False))(model).modified
            shared += rebuilt
            if not rebuilt and not folded:
                break
        shapes = SymbolicShapes(model, symbols).run()
        shapes.apply()
        details = self._report(model, shapes, bindings, replaced, shared)
        return QeffPassResult(model, True, details=details,
                              manifest={"fixed": {"bound": dict(bindings), "symbols": details["symbols"]}})

    def ensures(self, model: ir.Model) -> None:
        """A graph whose interface has no symbol left is static throughout: no Shape op remains."""
        graph = model.graph
        symbolic = any(not isinstance(d, int) for v in (*graph.inputs, *graph.outputs) for d in (v.shape or ()))
        left = [n.name or n.op_type for n in graph if n.op_type == "Shape"]
        if not symbolic and left:
            raise UnsupportedGraphError(f"fixed: every dim is bound, yet {len(left)} Shape op(s) remain "
                                        f"(e.g. {left[0]!r}), so the graph is not static",
                                        "report this model; bind fewer symbols in the meantime")

    # -- symbols -------------------------------------------------------------------------------
    def _resolve_symbols(self, graph: ir.Graph) -> tuple[dict[str, int], list[str]]:
        """The sizes to bind (by the model's own dim names) and the symbols that stay."""
        used = {d.value for v in (*graph.inputs, *graph.outputs) if v.shape is not None
                for d in v.shape if not isinstance(d, int) and d.value}
        sizes = {name: getattr(self.options, name) for name in _DECLARED if getattr(self.options, name) is not None}
        for item in self.options.sizes:
            name, size = _parse_size(item)
            sizes[name] = size
        bindings: dict[str, int] = {}
        for name, size in sizes.items():
            names = [n for n in used if n == name or _ALIASES.get(n) == name]
            if not names:
                close = difflib.get_close_matches(name, sorted(used), n=1)
                raise PassOptionError(
                    f"fixed: the model has no {name!r} dimension to bind",
                    (f"did you mean {close[0]!r}? " if close else "")
                    + f"its symbolic dims are: {', '.join(sorted(used)) or 'none'}",
                )
            for n in names:
                bindings[n] = size
        symbols = [*_DECLARED, *_DECODE_TIME, *(s for s in self.options.symbols if s not in (*_DECLARED, *_DECODE_TIME))]
        return bindings, symbols

    @staticmethod
    def _interface_shapes(graph: ir.Graph, bindings: dict[str, int], symbols: list[str]) -> dict[ir.Value, ir.Shape]:
        """The bound and renamed shapes of the graph's inputs and outputs, without writing them;
        an input dim that is neither a number nor a declared symbol is refused."""
        shapes = {}
        for value in (*graph.inputs, *graph.outputs):
            if value.shape is None:
                continue
            dims = [d if isinstance(d, int) else bindings.get(d.value, _ALIASES.get(d.value, d.value))
                    for d in value.shape]
            if value in graph.inputs:
                for axis, dim in enumerate(dims):
                    if not isinstance(dim, int) and dim not in symbols:
                        raise UnsupportedGraphError(
                            f"fixed: input {value.name!r} dim {axis} is {dim or 'unnamed'!r}, not a specialization symbol",
                            f"name it with fixed:symbols={dim or 'NAME'} (encoders), give it a size "
                            f"(fixed:{dim or 'NAME'}=N), or export with batch_size/seq_len/ctx_len dims",
                        )
            shapes[value] = ir.Shape([d if isinstance(d, int) or d in symbols else None for d in dims])
        return shapes

    # -- report --------------------------------------------------------------------------------
    def _report(self, model: ir.Model, shapes: SymbolicShapes, bindings: dict[str, int],
                replaced: collections.Counter, shared: int) -> dict[str, Any]:
        graph = model.graph
        interface_symbols = sorted({str(d) for v in graph.inputs for d in (shapes.shape(v) or ())
                                    if d is not None and not d.is_Integer})
        unresolved = [out.name for node in graph for out in node.outputs if not _fixed(shapes, out)]
        # Ops removed per type are in the report's "ops changed" column; the details add what
        # that column cannot show.
        details: dict[str, Any] = {"bound": dict(bindings), "symbols": interface_symbols}
        if replaced:
            details["ops_replaced"] = dict(replaced)
        if shared:
            details["shape_vectors_shared"] = shared
            details["shared_sizes"] = sorted(
                n.name.removeprefix(PREFIX) for n in graph if n.name and n.name.startswith(PREFIX) and n.op_type == "Shape")
        if unresolved:
            details["dims_unresolved"] = unresolved[:20]
            logger.warning("fixed: %d values have dims that are not fixed, e.g. %s", len(unresolved), unresolved[:3])
        if not interface_symbols:
            not_static = [out.name for node in graph for out in node.outputs
                          if out.shape is None or any(not isinstance(d, int) for d in out.shape)]
            if not_static:  # no Shape op is left then: ensures() checks that
                details["values_not_static"] = not_static[:20]
        return details


def _parse_size(item: str) -> tuple[str, int]:
    """``name=N`` -> (name, N), refusing what is not that or N outside 1..INT32_MAX (the bounds
    of the size fields, which a size written as text must meet too)."""
    name, _, text = item.partition("=")
    name, text = name.strip(), text.strip()
    if not name or not text.lstrip("+-").isdigit():
        raise PassOptionError(f"fixed: size {item!r} is not name=number", "e.g. fixed:sequence_length=128")
    size = int(text)
    if not 1 <= size <= INT32_MAX:
        raise PassOptionError(f"fixed: option {name}={size} must be at least 1 and at most {INT32_MAX}",
                              f"give the size of the dim, e.g. fixed:{name}=128")
    return name, size


def _fixed(shapes: SymbolicShapes, value: ir.Value) -> bool:
    dims = shapes.shape(value)
    return dims is not None and all(shapes.is_declared(d) for d in dims)


def _forget_inner_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes from earlier passes may be stale guesses; they are derived afresh."""
    boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            if id(out) not in boundary:
                out.shape = None
