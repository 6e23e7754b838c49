"""mxint8kv: the KV cache stored as MXINT8, simulated inside the graph (DESIGN §3.4)."""

from __future__ import annotations

__all__ = ["MXINT8KVPass", "MXINT8KVOptions", "mxint8_qdq"]

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from qeff.errors import UnsupportedGraphError
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.ir.builder import GraphBuilder, reroute_uses
from qeff.contract import cache_inputs_in_layer_order, is_cache_input, is_retained_output

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class MXINT8KVOptions:
    # Bounded like the weight passes' block (1..2**16): a block longer than head_dim is one block.
    block: int = dataclasses.field(default=32, metadata={"help": "elements per block along head_dim",
                                                         "min": 1, "max": 1 << 16})
    scale: Literal["ocp", "ocp_plus1"] = dataclasses.field(default="ocp", metadata={
        "help": "shared exponent floor(log2 amax), or one more (see DESIGN §3.4)"})


class MXINT8KVPass(QeffPass):
    """Make attention read the KV cache as MXINT8 values, as the card stores it with custom IO ``mxint8``.

    Rules:
    1. After each cache write (the ``ScatterND`` into a cache input of the KV contract) the
       whole updated cache goes through an MXINT8 quantize-dequantize in standard ONNX ops, so
       attention and the retained-state output both see exactly the stored values. Cached
       values are already on the grid and come out unchanged (quantization is idempotent).
    2. Blocks of ``block`` run along ``head_dim`` (zero-padded at the end); elements are
       code/64 × 2^s with codes ±127, ties to even — bit-identical to
       ``qeff.passes.mx.quantize_dequantize(x, "int8", axis=-1)``. An all-zero block takes
       s = 0, so no step divides by a scale that fp16 cannot hold: for cache values an fp16
       card can store (|x| ≥ 2^-24 or 0) every 2^s is an fp16 number.
    3. The manifest records custom-IO precision ``mxint8`` for every cache input and output.
    """

    name = "mxint8kv"
    summary = "KV cache stored as MXINT8 (custom IO mxint8), simulated in the graph"
    Options = MXINT8KVOptions
    requires_passes = ("kv",)
    once = True
    lossy = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        writes = []
        for node in graph:
            data = node.inputs[0] if node.op_type == "ScatterND" and node.inputs else None
            if data is not None and data in graph.inputs and is_cache_input(data.name):
                writes.append((node, data))
        if not writes:
            raise UnsupportedGraphError("mxint8kv: no cache write (ScatterND into a cache input) found",
                                        "run the kv pass first")
        for node, past in writes:
            if past.dtype != ir.DataType.FLOAT:
                raise UnsupportedGraphError(f"mxint8kv: {past.name} is {past.dtype}, not float32",
                                            "build the KV cache as float32 (kv:kv_dtype=float32)")
            head_dim = past.shape[-1] if past.shape is not None else None
            if not isinstance(head_dim, int):
                raise UnsupportedGraphError(f"mxint8kv: the head_dim of {past.name} is not a number")
            written = node.outputs[0]
            nodes, quantized = mxint8_qdq(graph, written, head_dim, self.options.block, self.options.scale,
                                          prefix=f"{past.name}/mxint8")
            graph.insert_after(node, nodes)
            quantized.dtype, quantized.shape = written.dtype, written.shape
            name = written.name
            reroute_uses(written, quantized, nodes[0], 0)
            if quantized in graph.outputs:  # the interface keeps the name, for the stored values
                written.name, quantized.name = f"{name}/unquantized", name
        names = cache_inputs_in_layer_order(v.name for v in graph.inputs)
        names += [v.name for v in graph.outputs if is_retained_output(v.name)]
        return QeffPassResult(model, True, details={"caches": [past.name for _, past in writes], "block": self.options.block},
                              manifest={"custom_io": {name: "mxint8" for name in names}, "kv": {"precision": "mxint8"}})


def mxint8_qdq(graph: ir.Graph, x: ir.Value, length: int, block: int, scale: str,
               prefix: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the MXINT8 quantize-dequantize of a rank-4 ``x`` along its last axis
    (``length`` elements): (nodes, result). The first node reads ``x`` as its input 0.

    The shared exponent is floor(log2 amax) computed exactly: Log gives it to within one, and
    comparing amax with 2^e and 2^(e+1) corrects it. Every other step multiplies or divides by a
    power of two, or rounds to an integer (``Round``: ties to even), so no step is inexact.
    """
    size = min(block, length)
    blocks = math.ceil(length / size)
    padded = blocks * size
    b = GraphBuilder(graph, 18, prefix)

    def const(name: str, array: Any, dtype: Any = np.float32) -> ir.Value:
        return b.const(np.asarray(array, dtype=dtype))

    def op(op_type: str, inputs: list[ir.Value], name: str, **attributes: Any) -> ir.Value:
        return b.op(op_type, inputs, attributes or None, name)

    source = op("Identity", [x], "input")
    if padded != length:
        pads = const("pads", [0, 0, 0, 0, 0, 0, 0, padded - length], np.int64)
        source = op("Pad", [source, pads], "pad")
    grouped = op("Reshape", [source, const("blocks", [0, 0, 0, blocks, size], np.int64)], "blocks")
    last = const("last", [-1], np.int64)
    amax = op("ReduceMax", [op("Abs", [grouped], "abs"), last], "amax", keepdims=1)
    # An all-zero block (the cache's unwritten rows) takes exponent 0: its codes are 0 at any
    # scale, and log2(0) would send the exponent to the clip's -127, whose 2^-127 is 0 in fp16,
    # so the card (and the fp16 simulation) would compute 0/0 = NaN there.
    one = const("one_f", 1.0)
    amax = op("Where", [op("Equal", [amax, const("zero_f", 0.0)], "all_zero"), one, amax], "amax_nonzero")
    two = const("two", 2.0)
    guess = op("Floor", [op("Div", [op("Log", [amax], "ln"), const("ln2", math.log(2.0))], "log2")], "floor")
    power = op("Pow", [two, guess], "power")
    too_big = op("Cast", [op("Greater", [power, amax], "too_big")], "too_big_f", to=ir.DataType.FLOAT)
    too_small = op("Cast", [op("LessOrEqual", [op("Mul", [power, two], "next"), amax], "too_small")],
                   "too_small_f", to=ir.DataType.FLOAT)
    exponent = op("Add", [op("Sub", [guess, too_big], "fix_down"), too_small], "exponent")
    if scale == "ocp_plus1":
        exponent = op("Add", [exponent, const("one", 1.0)], "plus1")
    shared = op("Clip", [exponent, const("min_exp", -127.0), const("max_exp", 127.0)], "shared")
    block_scale = op("Pow", [two, shared], "scale")
    codes = op("Round", [op("Mul", [op("Div", [grouped, block_scale], "scaled"), const("steps", 64.0)], "times64")],
               "round")
    codes = op("Clip", [codes, const("min_code", -127.0), const("max_code", 127.0)], "codes")
    values = op("Mul", [op("Div", [codes, const("steps_again", 64.0)], "elements"), block_scale], "values")
    bad = op("Or", [op("IsNaN", [grouped], "nan"), op("IsInf", [grouped], "inf")], "bad")
    bad_block = op("Greater", [op("ReduceMax", [op("Cast", [bad], "bad_f", to=ir.DataType.FLOAT), last], "any_bad",
                                  keepdims=1), const("zero", 0.0)], "bad_block")
    values = op("Where", [bad_block, const("nan", np.nan), values], "nan_blocks")
    flat = op("Reshape", [values, const("flat", [0, 0, 0, padded], np.int64)], "flat")
    if padded != length:
        flat = op("Slice", [flat, const("start", [0], np.int64), const("end", [length], np.int64), last], "unpad")
    return list(b.tape.nodes), flat
