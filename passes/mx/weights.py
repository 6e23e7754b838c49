"""mxfp6 / mxfp4 / mxfp8 / mxint8: MX fake-quantization of MatMul and Gemm weights (DESIGN §3.4)."""

from __future__ import annotations

__all__ = ["MXWeightOptions", "MXFP6Pass", "MXFP4Pass", "MXFP8Pass", "MXINT8Pass", "weight_uses"]

import ast
import collections
import dataclasses
import fnmatch
import functools
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from qeff.common.progress import bytes_progress
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.ir.builder import unique_name
from qeff.passes.mx.formats import ElementFormat, element_format
from qeff.passes.mx.stream import WeightError, quantize_tensor

logger = logging.getLogger(__name__)


# The OCP MX formats use 32; a block beyond this would only make the streamed chunks (whole
# blocks at a time) huge, and no format uses one.
MAX_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class MXWeightOptions:
    block: int = dataclasses.field(default=32, metadata={"help": "elements per block along the reduction axis",
                                                         "min": 1, "max": MAX_BLOCK})
    rounding: Literal["even", "nearest"] = dataclasses.field(default="even", metadata={
        "help": "ties to even, or away from zero"})
    scale: Literal["ocp", "ocp_plus1"] = dataclasses.field(default="ocp", metadata={
        "help": "shared exponent floor(log2 amax) - emax, or one more (see DESIGN §3.4)"})
    int8: Literal["symmetric", "full"] = dataclasses.field(default="symmetric", metadata={
        "help": "mxint8 codes ±127, or -128..127"})
    skip: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "glob patterns of weight names to leave alone, separated by |"})
    min_size: int = dataclasses.field(default=0, metadata={"help": "leave weights with fewer elements alone",
                                                           "min": 0, "max": 2**63 - 1})
    keep_lm_head: bool = dataclasses.field(default=False, metadata={
        "help": "leave the weight of the MatMul that produces the logits alone"})


@dataclasses.dataclass
class WeightUse:
    """A MatMul/Gemm that multiplies by a constant: the node input reading it, and the
    reduction axis in the weight's stored layout (through a Transpose)."""

    node: ir.Node
    index: int
    axis: int


def weight_uses(graph: ir.Graph) -> dict[ir.Value, list[WeightUse]]:
    """Float32 initializers used as the B operand of a MatMul or Gemm, directly or through one Transpose."""
    uses: dict[ir.Value, list[WeightUse]] = collections.defaultdict(list)
    for node in graph:
        if node.op_type == "MatMul":
            b_axis = -2
        elif node.op_type == "Gemm":
            b_axis = 1 if node.attributes.get_int("transB", 0) else 0
        else:
            continue
        b = node.inputs[1] if len(node.inputs) > 1 else None
        if b is None:
            continue
        reader, index, source = node, 1, b
        producer = b.producer()
        if producer is not None and producer.op_type == "Transpose" and len(b.uses()) == 1:
            source = producer.inputs[0]
            rank = source.const_value.shape.rank() if source is not None and source.const_value is not None else None
            if rank is None:
                continue
            perm = producer.attributes.get_ints("perm", list(range(rank))[::-1])
            b_axis = perm[b_axis % rank]
            reader, index = producer, 0
        if source is None or not source.is_initializer() or source.const_value is None:
            continue
        tensor = source.const_value
        if tensor.dtype != ir.DataType.FLOAT or tensor.shape.rank() < 2:
            continue
        uses[source].append(WeightUse(reader, index, b_axis % tensor.shape.rank()))
    return uses


def weight_label(value: ir.Value) -> str:
    """The name a user knows a weight by: dynamo exports fold ``W.T`` into a new initializer
    (``val_80``) and record the parameter it came from in its metadata."""
    folded = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from", "")
    try:
        sources = ast.literal_eval(folded) if folded else []
    except (ValueError, SyntaxError):
        sources = []
    return sources[0] if len(sources) == 1 and isinstance(sources[0], str) else (value.name or "")


def _logits_producers(graph: ir.Graph) -> set[ir.Node]:
    """The MatMul/Gemm nodes nearest to the logits output on every path (the lm_head)."""
    outputs = [v for v in graph.outputs if v.name == "logits"] or list(graph.outputs[:1])
    found, seen = set(), set()
    stack = [v.producer() for v in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.op_type in ("MatMul", "Gemm"):
            found.add(node)
            continue
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return found


class MXWeightPass(QeffPass):
    """Fake-quantize every constant weight of a MatMul (B) or Gemm (B, honouring transB) to an MX format.

    Rules:
    1. A float32 initializer used as the B operand of a MatMul or Gemm, directly or through a
       Transpose, is quantized and dequantized in place (blocks of ``block`` along the
       reduction axis, i.e. the axis the product sums over, mapped through the Transpose), so
       onnxruntime computes what the card computes with MX-stored weights.
    2. A weight that something else also reads (a tied embedding read by a Gather) keeps its
       value there; the MatMul gets a quantized copy.
    3. Weights matching ``skip``, with fewer than ``min_size`` elements, read along two
       different axes, or (``keep_lm_head``) producing the logits are left alone.
    4. An in-memory weight is quantized at once; a weight in external data is quantized,
       measured and written chunk by chunk as the model is saved, so a large model is read once
       and never held in memory (``qeff.passes.mx.stream``); its error appears in the report
       once it is written.
    Quantizing again gives the same weights, as the compiler will when it stores them.
    """

    fmt: ClassVar[str] = ""
    compiler_flag: ClassVar[str | None] = None
    lossy = True
    Options = MXWeightOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        element = element_format(self.fmt)
        graph = model.graph
        lm_head = _logits_producers(graph) if options.keep_lm_head else set()
        plan, skipped = self._plan(graph, lm_head)
        report: dict[str, dict[str, Any]] = {}
        details = {"format": element.name, "weights": report, "skipped": skipped, "weights_quantized": 0}
        total = sum(v.const_value.nbytes for v, _ in plan)
        with bytes_progress(total, f"{self.name}: quantizing weights", self.progress) as advance:
            for value, uses in plan:
                quantized, error = quantize_tensor(value.const_value, uses[0].axis, **self._kernel_options(element))
                entry = report[_report_key(report, value)] = {
                    "name": value.name, "shape": [int(d) for d in quantized.shape.numpy()], "axis": uses[0].axis}
                if error is None:  # streamed: measured as the weight is written
                    entry.update(sqnr_db=None, max_abs_error=None)
                    quantized.measured = functools.partial(_measured, details, entry)
                else:
                    _measured(details, entry, error)
                self._install(graph, value, uses, quantized)
                advance(value.const_value.nbytes)
        details["weights_quantized"] = len(report)
        return QeffPassResult(model, bool(report), details=details, manifest={"mx": self._manifest(len(report))})

    def _manifest(self, quantized: int) -> dict[str, Any]:
        o = self.options
        section = {"pass": self.name, "format": self.fmt, "block": o.block, "rounding": o.rounding,
                   "scale": o.scale, "weights": quantized}
        if self.fmt == "int8":
            section["int8"] = o.int8
        if self.compiler_flag:
            section["compiler_flag"] = self.compiler_flag
        return section

    def _kernel_options(self, element: ElementFormat) -> dict[str, Any]:
        o = self.options
        return {"fmt": element, "block": o.block, "rounding": o.rounding, "scale": o.scale, "int8": o.int8}

    def _plan(self, graph: ir.Graph, lm_head: set[ir.Node]) -> tuple[list[tuple[ir.Value, list[WeightUse]]], dict[str, str]]:
        plan, skipped = [], {}
        for value, uses in weight_uses(graph).items():
            name, label = value.name or "", weight_label(value)
            why = None
            if value.const_value.size == 0:
                why = "empty (nothing to quantize)"
            elif any(fnmatch.fnmatchcase(n, pattern) for pattern in self.options.skip for n in (name, label)):
                why = "matches skip"
            elif value.const_value.size < self.options.min_size:
                why = f"fewer than {self.options.min_size} elements"
            elif len({u.axis for u in uses}) > 1:
                why = "reduced along different axes by different MatMuls"
            elif lm_head and any(u.node in lm_head or any(c.node in lm_head for c in u.node.outputs[0].uses())
                                 for u in uses):
                why = "lm_head (keep_lm_head)"
            if why:
                skipped[label] = why
            else:
                plan.append((value, uses))
        return plan, skipped

    @staticmethod
    def _install(graph: ir.Graph, value: ir.Value, uses: list[WeightUse], quantized: ir.TensorProtocol) -> None:
        readers = {(u.node, u.index) for u in uses}
        others = [u for u in value.uses() if (u.node, u.idx) not in readers]
        if not others:
            value.const_value = quantized
            return
        copy = ir.Value(name=unique_name(graph, f"{value.name}/mx"), shape=value.shape, type=value.type,
                        const_value=quantized)
        graph.register_initializer(copy)
        for u in uses:
            u.node.replace_input_with(u.index, copy)



def _measured(details: dict[str, Any], entry: dict[str, Any], error: WeightError) -> None:
    """Record one weight's error in the pass's details (a streamed weight reports at save time)."""
    entry.update(sqnr_db=round(error.sqnr_db, 3), max_abs_error=error.max_abs)
    measured = [w["sqnr_db"] for w in details["weights"].values()
                if w["sqnr_db"] is not None and np.isfinite(w["sqnr_db"])]
    details["min_sqnr_db"] = min(measured) if measured else None


def _report_key(report: dict[str, Any], value: ir.Value) -> str:
    label = weight_label(value)
    return label if label not in report else value.name


class MXFP6Pass(MXWeightPass):
    name = "mxfp6"
    summary = "MXFP6 (fp6_e2m3) weights, what the compiler's -mxfp6-matmul stores"
    fmt = "fp6_e2m3"
    compiler_flag = "-mxfp6-matmul"


class MXFP4Pass(MXWeightPass):
    name = "mxfp4"
    summary = "MXFP4 (fp4_e2m1) weights"
    fmt = "fp4_e2m1"


class MXFP8Pass(MXWeightPass):
    name = "mxfp8"
    summary = "MXFP8 (fp8_e4m3) weights"
    fmt = "fp8_e4m3"


class MXINT8Pass(MXWeightPass):
    name = "mxint8"
    summary = "MXINT8 weights"
    fmt = "int8"
