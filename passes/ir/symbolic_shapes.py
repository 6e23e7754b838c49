"""Symbolic shapes over specialization symbols, for the ``fixed`` pass.

Every value gets its dims, and every small integer vector (the shape arithmetic of an export)
gets its elements, as sympy expressions of the declared symbols, which are positive integers.

onnx's own shape inference loses a dim as soon as it comes out of arithmetic: the output of
``Reshape(x, Concat(Shape(x)[0], [4]))`` or ``Range(0, Shape(x)[1])`` gets an ``unk__N`` name.
Here the shape values are evaluated symbolically, the ops whose output shape *is* data
(``Reshape``, ``Expand``, ``ConstantOfShape``, ``Range``, ``Tile``, ``Slice``, ``Concat`` and
broadcasting) take their dims from those values, and every other op runs onnx's own per-node
inference on symbolic input types. Dims that broadcasting proves equal are merged
(``Min(128, s)`` is ``s`` once it is added to a tensor of length ``s``), the way onnxruntime's
symbolic shape inference does with ``auto_merge``; that tool itself cannot read opset-18
reductions, which every export here has.
"""

from __future__ import annotations

__all__ = ["SymbolicShapes", "Expr"]

import logging
import math
from collections.abc import Callable, Iterable
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
import sympy

logger = logging.getLogger(__name__)

Expr = sympy.Expr
Dims = tuple[Optional[Expr], ...]
Content = tuple[Optional[Expr], ...]

# Shape vectors are short; a longer integer tensor is data, not shape arithmetic.
MAX_CONTENT = 64
_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8,
              ir.DataType.UINT64, ir.DataType.UINT32, ir.DataType.UINT16, ir.DataType.UINT8}
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "PRelu",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor",
}
_MAX_WALKS = 3
_BIG = 2**62  # an end index meaning "to the end" (exporters write INT64_MAX)


class SymbolicShapes:
    """Dims and small integer contents of every value of ``model.graph``.

    ``shapes[v]`` is a tuple with one expression (or None when unknown) per dim, or missing
    when the rank is unknown; ``contents[v]`` is the flattened elements of a small integer or
    boolean value (booleans as 0/1), None where an element is unknown.
    """

    def __init__(self, model: ir.Model, symbols: Iterable[str]) -> None:
        self.model = model
        self.graph = model.graph
        self.symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name in symbols}
        self._symbol_set = frozenset(self.symbols.values())
        self.shapes: dict[ir.Value, Dims] = {}
        self.contents: dict[ir.Value, Content] = {}
        self.merged: dict[Expr, Expr] = {}
        self._named: dict[str, Expr] = {str(s): s for s in self.symbols.values()}
        self._opset_ids = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        self._opset = model.opset_imports.get("", 18)

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> SymbolicShapes:
        for _ in range(_MAX_WALKS):
            known_merges = dict(self.merged)
            self._walk()
            if self.merged == known_merges:
                break
        return self

    def apply(self) -> None:
        """Write the dims into the IR (they end up in the model's ``value_info``)."""
        for node in self.graph:
            for out in node.outputs:
                dims = self.shapes.get(out)
                if dims is not None:
                    out.shape = ir.Shape([self.to_dim(d) for d in dims])

    def to_dim(self, expr: Expr | None) -> int | ir.SymbolicDim:
        text = self._dim_text(expr)
        return text if isinstance(text, int) else ir.SymbolicDim(text)

    def is_declared(self, expr: Expr | None) -> bool:
        """True for an integer or an expression of declared symbols only."""
        return expr is not None and expr.free_symbols <= self._symbol_set

    # -- reading values ----------------------------------------------------------------------
    def shape(self, value: ir.Value | None) -> Dims | None:
        if value is None:
            return None
        if value in self.shapes:
            return self.shapes[value]
        const = value.const_value
        if const is not None:
            return tuple(sympy.Integer(d) for d in const.shape)
        return self._from_ir(value.shape)

    def content(self, value: ir.Value | None) -> Content | None:
        if value is None:
            return None
        if value in self.contents:
            return self.contents[value]
        const = value.const_value
        if const is None or const.size > MAX_CONTENT or value in self.graph.inputs:
            return None
        return _array_content(const.numpy())

    def ints(self, value: ir.Value | None) -> list[int] | None:
        """A content whose elements are all plain integers, as Python ints."""
        content = self.content(value)
        if content is None or any(e is None or not e.is_Integer for e in content):
            return None
        return [int(e) for e in content]

    def _from_ir(self, shape: ir.Shape | None) -> Dims | None:
        if shape is None:
            return None
        dims = []
        for d in shape:
            if isinstance(d, int):
                dims.append(sympy.Integer(d))
            else:
                dims.append(self._named.get(d.value) if d.value else None)
        return tuple(dims)

    # -- the walk ----------------------------------------------------------------------------
    def _walk(self) -> None:
        self.shapes.clear()
        self.contents.clear()
        for value in self.graph.inputs:
            dims = self._from_ir(value.shape)
            if dims is not None:
                self.shapes[value] = dims
        for node in self.graph:
            self._visit(node)

    def _visit(self, node: ir.Node) -> None:
        default_domain = node.domain in ("", "ai.onnx")
        content = None
        if default_domain and node.op_type in _CONTENT_RULES and len(node.outputs) == 1:
            content = _CONTENT_RULES[node.op_type](self, node)
        computed: list[Dims | None] | None = None
        if default_domain and node.op_type in _SHAPE_RULES:
            dims = _SHAPE_RULES[node.op_type](self, node)
            computed = None if dims is None else [dims]
        if computed is None:
            computed = self._onnx_inference(node)
        for i, out in enumerate(node.outputs):
            dims = computed[i] if computed is not None and i < len(computed) else None
            dims = self._fill_from_ir(dims, out.shape)
            if dims is not None:
                self.shapes[out] = tuple(self._canonical(d) for d in dims)
        if content is not None and len(content) <= MAX_CONTENT:
            dims = self.shapes.get(node.outputs[0])
            if dims is not None and all(d is not None and d.is_Integer for d in dims) and \
                    math.prod(int(d) for d in dims) != len(content):
                # Contents are folded into constants: one that disagrees with the value's own
                # shape would write wrong numbers into the model, so it is dropped instead.
                logger.debug("%s: %d elements for shape %s; content dropped", node.name, len(content), dims)
                return
            self.contents[node.outputs[0]] = tuple(self._canonical(e) for e in content)

    def _fill_from_ir(self, dims: Dims | None, shape: ir.Shape | None) -> Dims | None:
        """Keep what the IR already knows where this walk found nothing."""
        known = self._from_ir(shape)
        if dims is None:
            return known
        if known is None or len(known) != len(dims):
            return dims
        return tuple(d if d is not None else k for d, k in zip(dims, known))

    def _canonical(self, expr: Expr | None) -> Expr | None:
        if expr is None:
            return None
        if self.merged:
            expr = expr.xreplace(self.merged)
        return expr

    def _onnx_inference(self, node: ir.Node) -> list[Dims | None] | None:
        if node.domain not in ("", "ai.onnx") or any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
        ):
            return None
        try:
            schema = onnx.defs.get_schema(node.op_type, self._opset, "")
        except onnx.defs.SchemaError:
            return None
        types: dict[str, onnx.TypeProto] = {}
        data: dict[str, onnx.TensorProto] = {}
        for value in node.inputs:
            if value is None:
                continue
            if value.dtype is None or not value.name:
                return None
            dims = self.shape(value)
            types[value.name] = onnx.helper.make_tensor_type_proto(
                value.dtype.value, None if dims is None else [self._dim_text(d) for d in dims]
            )
            array = self._known_array(value, dims)
            if array is not None:
                data[value.name] = onnx.numpy_helper.from_array(array, value.name)
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schema, ir.serde.serialize_node(node), types, data, opset_imports=self._opset_ids,
                ir_version=self.model.ir_version,
            )
        except Exception as e:  # onnx raises several types for shapes it finds inconsistent
            logger.debug("no per-node inference for %s: %s", node.name, e)
            return None
        result: list[Dims | None] = []
        for out in node.outputs:
            proto = inferred.get(out.name)
            if proto is None or not proto.tensor_type.HasField("shape"):
                result.append(None)
                continue
            result.append(tuple(
                sympy.Integer(d.dim_value) if d.HasField("dim_value")
                else self._named.get(d.dim_param) if d.HasField("dim_param") else None
                for d in proto.tensor_type.shape.dim
            ))
        return result

    def _known_array(self, value: ir.Value, dims: Dims | None) -> np.ndarray | None:
        """The value's data when it is a small constant or a fully evaluated shape vector."""
        const = value.const_value
        if const is not None and const.size <= MAX_CONTENT and value not in self.graph.inputs:
            return const.numpy()
        elements = self.ints(value) if value in self.contents else None
        if elements is None or dims is None or any(d is None or not d.is_Integer for d in dims):
            return None
        if math.prod(int(d) for d in dims) != len(elements):
            return None
        return np.array(elements, dtype=value.dtype.numpy()).reshape([int(d) for d in dims])

    def _dim_text(self, expr: Expr | None) -> int | str | None:
        """A dim as ONNX writes it: a number, or a name remembered as the expression it stands for."""
        if expr is None:
            return None
        if expr.is_Integer:
            return int(expr)
        text = str(expr)
        self._named[text] = expr
        return text

    # -- merging -----------------------------------------------------------------------------
    def broadcast(self, shapes: list[Dims]) -> Dims:
        """Multidirectional broadcasting; dims that must be equal at run time are merged."""
        rank = max(len(s) for s in shapes)
        padded = [(sympy.Integer(1),) * (rank - len(s)) + tuple(s) for s in shapes]
        return tuple(self.unify([s[i] for s in padded], broadcast=True) for i in range(rank))

    def unify(self, dims: list[Expr | None], broadcast: bool) -> Expr | None:
        known = [d for d in dims if d is not None]
        candidates = [d for d in known if d != 1] if broadcast else known
        if not candidates:
            return None if len(known) < len(dims) or not known else known[0]
        pick = min(candidates, key=_complexity)
        for other in candidates:
            # A compound dim proven equal to a simpler one is rewritten everywhere; a plain
            # symbol is never equated with a number (that would bind it behind the user's back).
            if other != pick and not other.is_Symbol and not other.is_Integer and pick.free_symbols:
                self.merged[other] = pick
        return pick


def _complexity(expr: Expr) -> tuple[int, int, str]:
    return (0 if expr.is_Integer else 1 if expr.is_Symbol else 2, sympy.count_ops(expr), str(expr))


# -- content rules (small integer vectors) ------------------------------------------------------
def _elementwise(fn: Callable[..., Expr | None]) -> Callable[[SymbolicShapes, ir.Node], Content | None]:
    def rule(s: SymbolicShapes, node: ir.Node) -> Content | None:
        contents = [s.content(v) for v in node.inputs]
        if any(c is None for c in contents):
            return None
        positions = _broadcast_positions(s, node.inputs, contents)
        if positions is None:
            return None
        out = []
        for index in positions:
            args = [c[i] for c, i in zip(contents, index)]
            out.append(None if any(a is None for a in args) else _safe(fn, node, *args))
        return tuple(out)
    return rule


def _broadcast_positions(s: SymbolicShapes, inputs: Iterable[ir.Value | None],
                         contents: list[Content]) -> list[tuple[int, ...]] | None:
    """For each element of a broadcast result, in order, the element it reads of each input.

    Contents are flattened, so the inputs' shapes decide the pairing: ``[4, 1]`` against
    ``[1, 4]`` gives 16 elements, not 4 (a causal mask built from two ``Range``). A single
    element broadcasts whatever its shape; otherwise every shape must be known in numbers.
    """
    if any(len(c) == 0 for c in contents):  # an empty vector broadcasts to nothing
        return [] if all(len(c) <= 1 for c in contents) else None
    wide = [i for i, c in enumerate(contents) if len(c) > 1]
    if len(wide) <= 1:  # single elements broadcast without reordering what they meet
        length = len(contents[wide[0]]) if wide else 1
        return [tuple(k if i in wide else 0 for i in range(len(contents))) for k in range(length)]
    shapes = []
    for value, content in zip(inputs, contents):
        if len(content) == 1:
            shapes.append(())
            continue
        dims = s.shape(value)
        if dims is not None and len(dims) == 1:  # a vector: its length is its content's
            dims = (sympy.Integer(len(content)),)
        if dims is None or any(d is None or not d.is_Integer for d in dims):
            return None
        shape = tuple(int(d) for d in dims)
        if math.prod(shape) != len(content):
            return None
        shapes.append(shape)
    try:
        result = np.broadcast_shapes(*shapes)
    except ValueError:
        return None
    if math.prod(result) > MAX_CONTENT:
        return None
    grids = np.broadcast_arrays(*(np.arange(len(c)).reshape(shape) for c, shape in zip(contents, shapes)))
    return list(zip(*(grid.reshape(-1).tolist() for grid in grids)))


def _safe(fn: Callable[..., Expr | None], node: ir.Node, *args: Expr) -> Expr | None:
    try:
        return fn(node, *args)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _is_float(node: ir.Node) -> bool:
    dtype = node.outputs[0].dtype
    return dtype is not None and dtype.is_floating_point()


def _div(node: ir.Node, a: Expr, b: Expr) -> Expr | None:
    if b == 0:
        return None
    if _is_float(node):
        return a / b
    if a.is_Integer and b.is_Integer:
        quotient = abs(int(a)) // abs(int(b))  # ONNX integer Div truncates toward zero
        return sympy.Integer(quotient if (int(a) < 0) == (int(b) < 0) else -quotient)
    if a.is_nonnegative and b.is_positive:
        return sympy.floor(a / b)
    return None


def _truth(relation: object) -> Expr | None:
    if relation is sympy.true or relation is True:
        return sympy.Integer(1)
    if relation is sympy.false or relation is False:
        return sympy.Integer(0)
    return None


def _c_shape(s: SymbolicShapes, node: ir.Node) -> Content | None:
    dims = s.shape(node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    return tuple(dims[start:end])


def _c_constant(s: SymbolicShapes, node: ir.Node) -> Content | None:
    if "value_int" in node.attributes:
        return (sympy.Integer(node.attributes.get_int("value_int")),)
    if "value_ints" in node.attributes:
        return tuple(sympy.Integer(i) for i in node.attributes.get_ints("value_ints"))
    if "value" in node.attributes:
        array = node.attributes["value"].as_tensor().numpy()
        return _array_content(array) if array.size <= MAX_CONTENT else None
    return None


def _is_integral(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_


def _array_content(array: np.ndarray) -> Content | None:
    """The elements of an integer or boolean array; None for any other element type."""
    if not _is_integral(array):
        return None
    return tuple(sympy.Integer(int(x)) for x in array.reshape(-1))


def _c_passthrough(s: SymbolicShapes, node: ir.Node) -> Content | None:
    return s.content(node.inputs[0])


def _c_cast(s: SymbolicShapes, node: ir.Node) -> Content | None:
    content = s.content(node.inputs[0])
    target = ir.DataType(node.attributes.get_int("to", 0))
    if content is None or not (target in _INT_TYPES or target == ir.DataType.BOOL or target.is_floating_point()):
        return None
    if target == ir.DataType.BOOL:
        return tuple(None if e is None else _truth(sympy.Ne(e, 0)) for e in content)
    if target in _INT_TYPES:  # float to integer truncates toward zero
        return tuple(None if e is None else _truncate(e) for e in content)
    return content


def _truncate(expr: Expr) -> Expr | None:
    if expr.is_integer:
        return expr
    if expr.is_nonnegative:
        return sympy.floor(expr)
    if expr.is_nonpositive:
        return sympy.ceiling(expr)
    return None


def _c_gather(s: SymbolicShapes, node: ir.Node) -> Content | None:
    data, indices = s.content(node.inputs[0]), s.ints(node.inputs[1])
    dims = s.shape(node.inputs[0])
    if data is None or indices is None or dims is None or len(dims) != 1:
        return None
    n = len(data)
    if any(not -n <= i < n for i in indices):
        return None
    return tuple(data[i] for i in indices)


def _c_slice(s: SymbolicShapes, node: ir.Node) -> Content | None:
    data = s.content(node.inputs[0])
    dims = s.shape(node.inputs[0])
    starts, ends = s.ints(node.inputs[1]), s.ints(node.inputs[2])
    axes = s.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = s.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if data is None or dims is None or len(dims) != 1 or None in (starts, ends, axes, steps):
        return None
    if len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
        return None
    return tuple(data[slice(starts[0], ends[0], steps[0])])


def _c_concat(s: SymbolicShapes, node: ir.Node) -> Content | None:
    parts = [s.content(v) for v in node.inputs]
    if any(p is None for p in parts):
        return None
    # Joining flattened contents is the concatenation only when every dim before the axis is
    # 1 (vectors, or [1, n] rows joined along axis 1); otherwise the elements interleave.
    axis = node.attributes.get_int("axis", 0)
    for value in node.inputs:
        dims = s.shape(value)
        if dims is None:
            return None
        leading = dims[:axis + len(dims) if axis < 0 else axis]
        if any(d is None or d != 1 for d in leading):
            return None
    return tuple(e for p in parts for e in p)


def _c_where(s: SymbolicShapes, node: ir.Node) -> Content | None:
    def pick(_node: ir.Node, cond: Expr, a: Expr, b: Expr) -> Expr | None:
        if not cond.is_Integer:
            return None
        return a if cond != 0 else b
    return _elementwise(pick)(s, node)


def _c_range(s: SymbolicShapes, node: ir.Node) -> Content | None:
    args = [s.ints(v) for v in node.inputs]
    if any(a is None or len(a) != 1 for a in args):
        return None
    start, limit, delta = (a[0] for a in args)
    if delta == 0 or max(0, math.ceil((limit - start) / delta)) > MAX_CONTENT:
        return None
    return tuple(sympy.Integer(i) for i in range(start, limit, delta))


def _c_constant_of_shape(s: SymbolicShapes, node: ir.Node) -> Content | None:
    shape = s.ints(node.inputs[0])
    if shape is None or math.prod(shape) > MAX_CONTENT:
        return None
    fill = 0
    if "value" in node.attributes:
        array = node.attributes["value"].as_tensor().numpy()
        if not _is_integral(array):
            return None
        fill = int(array.reshape(-1)[0])
    return (sympy.Integer(fill),) * math.prod(shape)


def _c_size(s: SymbolicShapes, node: ir.Node) -> Content | None:
    dims = s.shape(node.inputs[0])
    if dims is None or any(d is None for d in dims):
        return None
    return (sympy.Mul(*dims),)


_CONTENT_RULES: dict[str, Callable[[SymbolicShapes, ir.Node], Content | None]] = {
    "Shape": _c_shape,
    "Size": _c_size,
    "Constant": _c_constant,
    "Identity": _c_passthrough,
    "Reshape": _c_passthrough,
    "Flatten": _c_passthrough,
    "Squeeze": _c_passthrough,
    "Unsqueeze": _c_passthrough,
    "Cast": _c_cast,
    "Gather": _c_gather,
    "Slice": _c_slice,
    "Concat": _c_concat,
    "Where": _c_where,
    "Range": _c_range,
    "ConstantOfShape": _c_constant_of_shape,
    "Add": _elementwise(lambda n, a, b: a + b),
    "Sub": _elementwise(lambda n, a, b: a - b),
    "Mul": _elementwise(lambda n, a, b: a * b),
    "Div": _elementwise(_div),
    "Mod": _elementwise(lambda n, a, b: sympy.Mod(a, b) if b != 0 and n.attributes.get_int("fmod", 0) == 0 else None),
    "Max": _elementwise(lambda n, *a: sympy.Max(*a)),
    "Min": _elementwise(lambda n, *a: sympy.Min(*a)),
    "Neg": _elementwise(lambda n, a: -a),
    "Abs": _elementwise(lambda n, a: sympy.Abs(a)),
    "Floor": _elementwise(lambda n, a: sympy.floor(a)),
    "Ceil": _elementwise(lambda n, a: sympy.ceiling(a)),
    "Equal": _elementwise(lambda n, a, b: _truth(sympy.Eq(a, b))),
    "Less": _elementwise(lambda n, a, b: _truth(sympy.Lt(a, b))),
    "LessOrEqual": _elementwise(lambda n, a, b: _truth(sympy.Le(a, b))),
    "Greater": _elementwise(lambda n, a, b: _truth(sympy.Gt(a, b))),
    "GreaterOrEqual": _elementwise(lambda n, a, b: _truth(sympy.Ge(a, b))),
    "Not": _elementwise(lambda n, a: 1 - a),
    "And": _elementwise(lambda n, a, b: _truth(a != 0 and b != 0)),
    "Or": _elementwise(lambda n, a, b: _truth(a != 0 or b != 0)),
}


# -- shape rules (ops whose output shape is data) ---------------------------------------------
def _s_elementwise(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    shapes = [s.shape(v) for v in node.inputs if v is not None]
    if not shapes or any(sh is None for sh in shapes):
        return None
    return s.broadcast(shapes)


def _s_reshape(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    target = s.content(node.inputs[1])
    dims = s.shape(node.inputs[0])
    if target is None:
        return None
    allow_zero = node.attributes.get_int("allowzero", 0)
    out: list[Expr | None] = []
    for i, t in enumerate(target):
        if t is not None and t == 0 and not allow_zero:
            out.append(dims[i] if dims is not None and i < len(dims) else None)
        else:
            out.append(t)
    if any(t is not None and t == -1 for t in out):
        known = [d for d in out if d is None or d != -1]
        if dims is None or any(d is None for d in dims) or any(d is None for d in known):
            return tuple(None if d is not None and d == -1 else d for d in out)
        rest = sympy.simplify(sympy.Mul(*dims) / sympy.Mul(*known))
        out = [rest if d is not None and d == -1 else d for d in out]
    return tuple(out)


def _s_expand(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    dims, target = s.shape(node.inputs[0]), s.content(node.inputs[1])
    if dims is None or target is None:
        return None
    return s.broadcast([dims, target])


def _s_constant_of_shape(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    return s.content(node.inputs[0])


def _s_range(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    args = [s.content(v) for v in node.inputs]
    if any(a is None or len(a) != 1 or a[0] is None for a in args):
        return None
    start, limit, delta = (a[0] for a in args)
    if delta == 0:
        return None
    return (sympy.simplify(sympy.Max(sympy.ceiling((limit - start) / delta), 0)),)


def _s_tile(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    dims, repeats = s.shape(node.inputs[0]), s.content(node.inputs[1])
    if dims is None or repeats is None or len(dims) != len(repeats):
        return None
    return tuple(None if d is None or r is None else d * r for d, r in zip(dims, repeats))


def _s_slice(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    dims = s.shape(node.inputs[0])
    starts, ends = s.content(node.inputs[1]), s.content(node.inputs[2])
    rank = None if dims is None else len(dims)
    if dims is None or starts is None or ends is None:
        return None
    axes = s.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts)))
    steps = s.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(starts)
    if axes is None or steps is None:
        return None
    out = list(dims)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + rank if axis < 0 else axis
        out[axis] = _slice_length(dims[axis], start, end, step)
    return tuple(out)


def _slice_length(dim: Expr | None, start: Expr | None, end: Expr | None, step: int) -> Expr | None:
    if dim is None or start is None or end is None:
        return None
    if dim.is_Integer and start.is_Integer and end.is_Integer:
        return sympy.Integer(len(range(int(dim))[int(start):int(end):step]))
    if step != 1:
        return None
    bounds = []
    for index in (start, end):
        if index.is_Integer and int(index) >= _BIG:
            index = dim
        elif index.is_negative:
            index = dim + index
        elif not index.is_nonnegative:
            return None
        bounds.append(sympy.Max(0, sympy.Min(index, dim)))
    return sympy.Max(0, bounds[1] - bounds[0])


def _s_concat(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    shapes = [s.shape(v) for v in node.inputs]
    if any(sh is None for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
        return None
    rank = len(shapes[0])
    axis = node.attributes.get_int("axis", 0)
    axis = axis + rank if axis < 0 else axis
    out = []
    for i in range(rank):
        column = [sh[i] for sh in shapes]
        if i == axis:
            out.append(None if any(d is None for d in column) else sympy.Add(*column))
        else:
            out.append(s.unify(column, broadcast=False))
    return tuple(out)


def _s_flatten(s: SymbolicShapes, node: ir.Node) -> Dims | None:
    dims = s.shape(node.inputs[0])
    if dims is None or any(d is None for d in dims):
        return None
    axis = node.attributes.get_int("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    return (sympy.Mul(*dims[:axis]), sympy.Mul(*dims[axis:]))


_SHAPE_RULES: dict[str, Callable[[SymbolicShapes, ir.Node], Dims | None]] = {
    **{op: _s_elementwise for op in _ELEMENTWISE},
    "Reshape": _s_reshape,
    "Expand": _s_expand,
    "ConstantOfShape": _s_constant_of_shape,
    "Range": _s_range,
    "Tile": _s_tile,
    "Slice": _s_slice,
    "Concat": _s_concat,
    "Flatten": _s_flatten,
}
