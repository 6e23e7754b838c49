"""fold: constant folding of small subgraphs, shape arithmetic included."""

from __future__ import annotations

__all__ = ["FoldPass"]

import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qeff.passes.infra.base import INT32_MAX, QeffPass, QeffPassResult

logger = logging.getLogger(__name__)

# Ops whose result is not a pure function of their inputs, or that carry graphs.
_NEVER_FOLD = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
    "SequenceAt", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
    "OptionalHasElement", "Constant",
}

# An element of a partially known integer vector: a concrete int, a symbolic dim, or unknown.
Element = Union[int, ir.SymbolicDim, None]


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    max_elements: int = dataclasses.field(
        default=8192,
        metadata={
            "help": "largest tensor (elements) a folded node may read or produce; keeps "
            "masks and weights from being materialised",
            "min": 1,
            "max": INT32_MAX,
        },
    )
    infer_shapes: bool = dataclasses.field(
        default=True, metadata={"help": "run ONNX shape inference first when shapes are missing"}
    )


class FoldPass(QeffPass):
    """Replace subgraphs that compute constants by their values.

    Rules:
    1. A default-domain node whose inputs are all constants (initializers that are not graph
       inputs, or ``Constant`` outputs) is evaluated with the ONNX reference implementation
       at the model's opset and replaced by initializers — if every input and output holds at
       most ``max_elements`` elements. Random ops, control flow and sequences are never folded.
    2. ``Shape(x)`` is a constant when the dims it reads are static, whatever x's data.
    3. Shape vectors that are only partly known are tracked element by element through
       ``Shape, Gather, Slice, Concat, Unsqueeze, Squeeze, Reshape, Cast, Identity`` and
       scalar ``Add/Sub/Mul/Div``; a node whose result becomes fully known is folded, so
       ``Gather(Shape(x), 2)`` folds when dim 2 is static even if dims 0 and 1 are symbolic.
    4. Nodes whose outputs are graph outputs stay (the interface keeps its producers), and
       inputs left unused by folding are removed.
    """

    name = "fold"
    summary = "fold constant subgraphs and shape arithmetic (size-limited; weights are never materialised)"
    Options = FoldOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.options.infer_shapes and _missing_shapes(model.graph):
            ShapeInferencePass(strict_mode=False)(model)
        opset = model.graph.opset_imports.get("", model.opset_imports.get("", 18))
        folder = _GraphFolder(model.graph, opset, self.options.max_elements)
        folder.run()
        if folder.folded:
            RemoveUnusedNodesPass()(model)
        _forget_placeholder_dims(model.graph)
        details = {"folded": dict(folder.folded)} if folder.folded else {}
        if folder.failures:
            details["not_evaluable"] = dict(folder.failures)
        return QeffPassResult(model, modified=bool(folder.folded), details=details)


def _forget_placeholder_dims(graph: ir.Graph) -> None:
    """Shape inference names dims it cannot resolve ``unk__N``; once folding has changed the
    graph those names are stale guesses, so they become unknown dims (later passes re-infer)."""
    for node in graph:
        for out in node.outputs:
            shape = out.shape
            if shape is not None and any(
                not isinstance(d, int) and (d.value or "").startswith("unk__") for d in shape
            ):
                out.shape = ir.Shape(
                    [d if isinstance(d, int) or not (d.value or "").startswith("unk__") else None for d in shape]
                )


def _missing_shapes(graph: ir.Graph) -> bool:
    return any(
        out.shape is None for node in graph for out in node.outputs if out.name and out.uses()
    )


class _GraphFolder:
    def __init__(self, graph: ir.Graph, opset: int, max_elements: int) -> None:
        self.graph = graph
        self.opset = opset
        self.max_elements = max_elements
        self.partial: dict[ir.Value, list[Element]] = {}
        self.scalars: set[ir.Value] = set()
        self.folded: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()
        self.graph_outputs = set(graph.outputs)
        self.graph_inputs = set(graph.inputs)

    # -- constants -----------------------------------------------------------------------
    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value in self.graph_inputs:
            return None
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None:
            return None
        if tensor.size > self.max_elements and value not in self.partial:
            return None
        return tensor.numpy()

    def vector(self, value: ir.Value | None) -> list[Element] | None:
        """A 0-D or 1-D integer value as a list of elements (scalars as one element)."""
        if value is None:
            return None
        if value in self.partial:
            return self.partial[value]
        array = self.constant(value)
        if array is None or array.ndim > 1 or not np.issubdtype(array.dtype, np.integer):
            return None
        return [int(x) for x in array.reshape(-1)]

    def is_scalar(self, value: ir.Value | None) -> bool:
        if value in self.scalars:
            return True
        if value in self.partial:
            return False
        array = self.constant(value)
        return array is not None and array.ndim == 0

    # -- driver --------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
                continue
            if any(out in self.graph_outputs for out in node.outputs):
                continue
            if node.op_type == "Shape" or any(v in self.partial for v in node.inputs):
                propagated = self._propagate(node)
                if propagated is not None:
                    elements, scalar = propagated
                    out = node.outputs[0]
                    if all(isinstance(e, int) for e in elements):
                        dtype = out.dtype.numpy() if out.dtype is not None else np.int64
                        array = np.array(elements, dtype=dtype)
                        self._replace(node, [array.reshape(()) if scalar else array])
                    else:
                        self.partial[out] = elements
                        if scalar:
                            self.scalars.add(out)
                    continue
            self._try_evaluate(node)

    # -- rule 1: evaluate nodes with constant inputs -------------------------------------
    def _try_evaluate(self, node: ir.Node) -> None:
        inputs = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
                continue
            array = self.constant(value)
            if array is None or value in self.partial:
                return
            inputs.append(array)
        if not node.inputs and node.op_type != "ConstantOfShape":
            return
        try:
            outputs = _evaluate(node, inputs, self.opset)
        except Exception as e:  # the reference runtime raises many types; skip, never fail
            logger.debug("cannot evaluate %s (%s): %s", node.name, node.op_type, e)
            self.failures[node.op_type] += 1
            return
        if any(o.size > self.max_elements for o in outputs):
            return
        self._replace(node, outputs)

    # -- rule 2 and 3: partial shape vectors ---------------------------------------------
    def _propagate(self, node: ir.Node) -> tuple[list[Element], bool] | None:
        """The node's output as elements plus whether it is 0-D, or None if not trackable."""
        op = node.op_type
        ins = node.inputs
        if op == "Shape":
            shape = ins[0].shape if ins[0] is not None else None
            if shape is None:
                return None
            dims: list[Element] = [d if isinstance(d, int) else (d if d.value else None) for d in shape]
            rank = len(dims)
            start = _clamp_index(node.attributes.get_int("start", 0), rank)
            end_attr = node.attributes.get_int("end", None)
            end = rank if end_attr is None else _clamp_index(end_attr, rank)
            return dims[start:end], False
        if op in ("Identity", "Cast"):
            data = self.vector(ins[0])
            return None if data is None else (data, self.is_scalar(ins[0]))
        if op == "Gather":
            data, indices = self.vector(ins[0]), self.constant(ins[1])
            if data is None or indices is None or indices.ndim > 1:
                return None
            if node.attributes.get_int("axis", 0) not in (0, -1):
                return None
            try:
                return [data[int(i)] for i in indices.reshape(-1)], indices.ndim == 0
            except IndexError:
                return None
        if op == "Concat":
            parts = [self.vector(v) for v in ins]
            if any(p is None for p in parts):
                return None
            return [e for p in parts for e in p], False  # type: ignore[union-attr]
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            data = self.vector(ins[0])
            if data is None or len(data) != 1:
                return None
            if op == "Reshape":
                target = self.constant(ins[1])
                if target is None:
                    return None
                return data, target.size == 0
            return data, op == "Squeeze"
        if op == "Slice":
            data = self._slice(node)
            return None if data is None else (data, False)
        if op in ("Add", "Sub", "Mul", "Div"):
            a, b = self.vector(ins[0]), self.vector(ins[1])
            if a is None or b is None:
                return None
            if len(a) != len(b):
                if len(a) == 1:
                    a = a * len(b)
                elif len(b) == 1:
                    b = b * len(a)
                else:
                    return None
            scalar = self.is_scalar(ins[0]) and self.is_scalar(ins[1])
            return [_arith(op, x, y) for x, y in zip(a, b)], scalar
        return None

    def _slice(self, node: ir.Node) -> list[Element] | None:
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        data = self.vector(ins[0])
        if data is None:
            return None
        if self.opset < 10:
            starts = node.attributes.get_ints("starts", None)
            ends = node.attributes.get_ints("ends", None)
            axes, steps = node.attributes.get_ints("axes", None), None
        else:
            starts, ends = self.constant(ins[1]), self.constant(ins[2])
            axes = self.constant(ins[3]) if ins[3] is not None else None
            steps = self.constant(ins[4]) if ins[4] is not None else None
            if starts is None or ends is None or (ins[3] is not None and axes is None) or (
                ins[4] is not None and steps is None
            ):
                return None
        if axes is not None and [int(a) for a in np.reshape(axes, -1)] not in ([0], [-1]):
            return None
        step = int(np.reshape(steps, -1)[0]) if steps is not None else 1
        start = int(np.reshape(starts, -1)[0])
        end = int(np.reshape(ends, -1)[0])
        if step == 0:
            return None
        # Python slicing adds the length to negative bounds and clamps out-of-range ones,
        # which is what ONNX Slice specifies for a 1-D input.
        return data[start:end:step]

    # -- rewriting -----------------------------------------------------------------------
    def _replace(self, node: ir.Node, arrays: Sequence[np.ndarray]) -> None:
        outputs = list(node.outputs)
        if len(arrays) != len(outputs):
            return
        replacements = []
        for out, array in zip(outputs, arrays):
            tensor = ir.tensor(np.asarray(array), name=out.name)
            value = ir.Value(
                name=None, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
            )
            replacements.append(value)
        for out, value in zip(outputs, replacements):
            ir.convenience.replace_all_uses_with(out, value)
            self.partial.pop(out, None)
        names = [out.name for out in outputs]
        self.graph.remove(node, safe=True)
        for name, value in zip(names, replacements):
            if not value.uses():
                continue
            value.name = name
            self.graph.register_initializer(value)
        self.folded[node.op_type] += 1


def _clamp_index(index: int, rank: int) -> int:
    if index < 0:
        index += rank
    return max(0, min(index, rank))


def _arith(op: str, x: Element, y: Element) -> Element:
    if not isinstance(x, int) or not isinstance(y, int):
        return None
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    if op == "Mul":
        return x * y
    if y == 0:
        return None
    # ONNX integer Div truncates toward zero.
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y >= 0) else -q


def _evaluate(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run one node with the ONNX reference implementation at the model's opset."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if array is not None else "" for i, array in enumerate(inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    proto_node = ir.serde.serialize_node(node)
    del proto_node.input[:]
    proto_node.input.extend(names)
    del proto_node.output[:]
    proto_node.output.extend(outs)
    graph_inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in zip(names, inputs)
        if a is not None
    ]
    graph_outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in outs]
    graph = onnx.helper.make_graph([proto_node], "fold", graph_inputs, graph_outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    evaluator = ReferenceEvaluator(model)
    feeds = {n: a for n, a in zip(names, inputs) if a is not None}
    return [np.asarray(r) for r in evaluator.run(None, feeds)]
