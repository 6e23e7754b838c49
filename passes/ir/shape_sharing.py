"""One shared computation per specialization symbol, for the ``fixed`` pass.

An export computes the same sizes many times over: every layer reads ``Shape(hidden)[0]`` and
``Shape(hidden)[1]`` again, concatenates them with constants and feeds the result to a
``Reshape``. Once :class:`~qeff.passes.symbolic_shapes.SymbolicShapes` knows what each shape
vector holds (``[batch_size, seq_len, 4, 16]``), the vector is rebuilt from one
``Shape(<graph input>)`` slice per symbol, created once at the top of the graph, plus constants;
a size that is an expression (``batch_size*seq_len``) is computed once too. The old arithmetic
then has no users and is removed. A vector whose elements are all numbers becomes a constant.
"""

from __future__ import annotations

__all__ = ["share_shape_arithmetic"]

import logging

import numpy as np
import onnx_ir as ir
import sympy

from qeff.passes.ir.builder import add_initializer
from qeff.passes.ir.symbolic_shapes import Expr, SymbolicShapes

logger = logging.getLogger(__name__)

PREFIX = "qeff_fixed/"
_VECTOR_TYPES = {ir.DataType.INT64, ir.DataType.INT32}


class _Unsupported(Exception):
    """An expression with no exact integer lowering (e.g. a ceiling of a fraction)."""


class _SharedSizes:
    """Builds and caches the shared nodes; they are inserted before the first node."""

    def __init__(self, graph: ir.Graph, shapes: SymbolicShapes) -> None:
        self.graph = graph
        self.shapes = shapes
        self.nodes: list[ir.Node] = []
        self.vectors: dict[Expr, ir.Value] = {}
        self.scalars: dict[Expr, ir.Value] = {}
        self.constants: dict[tuple[bool, tuple[int, ...]], ir.Value] = {}
        self.sources: dict[Expr, tuple[ir.Value, int]] = {}
        for value in graph.inputs:
            for axis, dim in enumerate(shapes.shape(value) or ()):
                if dim is not None and dim.is_Symbol and dim not in self.sources:
                    self.sources[dim] = (value, axis)
        self._existing = {v.name for v in graph.initializers.values()}

    def constant(self, elements: tuple[int, ...], scalar: bool = False) -> ir.Value:
        key = (scalar, elements)
        if key not in self.constants:
            array = np.array(elements[0] if scalar else elements, dtype=np.int64)
            name = self._unique(f"{PREFIX}const_{'_'.join(str(e) for e in elements) or 'empty'}")
            self.constants[key] = add_initializer(self.graph, name, array)
        return self.constants[key]

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._existing:
            candidate, i = f"{name}_{i}", i + 1
        self._existing.add(candidate)
        return candidate

    def _node(self, op: str, inputs: list[ir.Value], label: str, shape: list[int], **attributes: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=self._unique(f"{PREFIX}{label}"))
        out = node.outputs[0]
        out.name = node.name
        out.dtype = ir.DataType.INT64
        out.shape = ir.Shape(shape)
        self.nodes.append(node)
        return out

    def vector_of(self, expr: Expr) -> ir.Value:
        """A ``[1]`` int64 value holding ``expr``."""
        if expr in self.vectors:
            return self.vectors[expr]
        if expr.is_Integer:
            return self.constant((int(expr),))
        label = _label(expr)
        if expr.is_Symbol:
            if expr not in self.sources:
                raise _Unsupported(f"no graph input has a dim named {expr}")
            value, axis = self.sources[expr]
            out = self._node("Shape", [value], label, [1], start=axis, end=axis + 1)
        elif expr.is_Add or expr.is_Mul or isinstance(expr, (sympy.Max, sympy.Min)):
            op = {sympy.Add: "Add", sympy.Mul: "Mul", sympy.Max: "Max", sympy.Min: "Min"}[expr.func]
            args = sorted(expr.args, key=str)
            if op == "Mul" and any(a.is_Pow and a.exp.is_negative for a in args):
                raise _Unsupported(f"{expr} is a fraction")
            out = self.vector_of(args[0])
            for arg in args[1:]:
                out = self._node(op, [out, self.vector_of(arg)], label, [1])
        elif expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 1:
            base = self.vector_of(expr.base)
            out = base
            for _ in range(int(expr.exp) - 1):
                out = self._node("Mul", [out, base], label, [1])
        elif isinstance(expr, sympy.floor):
            numerator, denominator = sympy.fraction(expr.args[0])
            if denominator == 1 or not (numerator.is_nonnegative and denominator.is_positive):
                raise _Unsupported(f"{expr} has no exact integer division")
            out = self._node("Div", [self.vector_of(numerator), self.vector_of(denominator)], label, [1])
        elif isinstance(expr, sympy.Mod):
            out = self._node("Mod", [self.vector_of(expr.args[0]), self.vector_of(expr.args[1])], label, [1])
        else:
            raise _Unsupported(f"no integer lowering for {expr}")
        self.vectors[expr] = out
        return out

    def scalar_of(self, expr: Expr) -> ir.Value:
        if expr.is_Integer:
            return self.constant((int(expr),), scalar=True)
        if expr not in self.scalars:
            axes = self.constant((0,))
            self.scalars[expr] = self._node("Squeeze", [self.vector_of(expr), axes], f"{_label(expr)}_scalar", [])
        return self.scalars[expr]

    def build(self, elements: tuple[Expr, ...], scalar: bool) -> ir.Value:
        if scalar:
            return self.scalar_of(elements[0])
        if all(e.is_Integer for e in elements):
            return self.constant(tuple(int(e) for e in elements))
        pieces: list[ir.Value] = []
        run: list[int] = []
        for e in elements:
            if e.is_Integer:
                run.append(int(e))
                continue
            if run:
                pieces.append(self.constant(tuple(run)))
                run = []
            pieces.append(self.vector_of(e))
        if run:
            pieces.append(self.constant(tuple(run)))
        if len(pieces) == 1:
            return pieces[0]
        key = tuple(elements)
        if key not in self.vectors:
            self.vectors[key] = self._node("Concat", pieces, "shape", [len(elements)], axis=0)
        return self.vectors[key]

    def insert(self) -> None:
        if not self.nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(self.nodes)
        else:
            self.graph.insert_before(first, self.nodes)


def _label(expr: Expr) -> str:
    text = str(expr).replace("*", "_x_").replace("+", "_plus_").replace(" ", "").replace("-", "minus_")
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


def share_shape_arithmetic(model: ir.Model, shapes: SymbolicShapes) -> int:
    """Rebuild every fully known shape vector from shared per-symbol values; returns how many.

    A vector is rebuilt where it leaves the shape arithmetic: some user of it does not itself
    produce a fully known vector (a ``Reshape``, ``Expand``, ``Range``…). Graph outputs and
    vectors that already are one of the shared values are left alone.
    """
    graph = model.graph
    sizes = _SharedSizes(graph, shapes)
    known = {v for v, c in shapes.contents.items() if all(e is not None and shapes.is_declared(e) for e in c)}
    outputs = set(graph.outputs)
    rebuilt = 0
    for node in list(graph):
        if node.name and node.name.startswith(PREFIX) or node.op_type == "Constant":
            continue
        for value in node.outputs:
            if value not in known or value in outputs or value.dtype not in _VECTOR_TYPES:
                continue
            dims = shapes.shape(value)
            if dims is None or len(dims) > 1:
                continue
            if all(use.node.outputs and all(out in known for out in use.node.outputs) for use in value.uses()):
                continue  # still inside the arithmetic: its users get rebuilt instead
            try:
                replacement = sizes.build(shapes.contents[value], scalar=len(dims) == 0)
            except _Unsupported as e:
                logger.debug("fixed: %s kept as is: %s", value.name, e)
                continue
            if value.dtype != ir.DataType.INT64:
                cast = ir.node("Cast", [replacement], attributes={"to": value.dtype}, name=f"{value.name}_as_int32")
                cast.outputs[0].dtype = value.dtype
                cast.outputs[0].shape = value.shape
                graph.insert_before(node, cast)  # placed later, after `insert` adds the sources
                replacement = cast.outputs[0]
            ir.convenience.replace_all_uses_with(value, replacement)
            rebuilt += 1
    sizes.insert()
    if rebuilt:
        logger.debug("fixed: rebuilt %d shape vectors from %d shared values", rebuilt, len(sizes.nodes))
    return rebuilt
