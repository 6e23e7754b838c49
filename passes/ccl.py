"""ccl: compute context lengths — attention reads only the cache slots a step can see.

With a cache of ``ctx_len`` slots every decode step reads all of it, although a query at
position p sees only slots <= p. QEfficient's compute context lengths give the compiled model
several smaller read lengths, and the runtime picks, per call, the smallest one above every
position in it; the cache itself stays ``ctx_len`` long.

Rules:
1. A new input ``comp_ctx_lengths`` (int64, ``[comp_ctx_lengths]``); only its length is read.
2. Every read of a layer's updated cache (the ``ScatterND`` kv writes, other than the retained
   output itself) reads the slots ``[0, comp_ctx_lengths)`` only: K and V are sliced before the
   score and value MatMuls. The slot range kv's mask and ALiBi are built from
   (``Range(0, ctx_len)``, ``ctx_len`` read from the first cache input's shape) becomes
   ``Range(0, comp_ctx_lengths)``, so mask and bias are sliced with them. The write still
   covers the whole cache.
3. Slots at or past a query's position were masked to exactly zero probability, so a length
   above every position of the call gives the full cache's result.
4. Requires ``kv``, before ``fixed`` (which folds the shape read this pass rebuilds): refused
   otherwise, one line. The manifest records the lists (``ccl.prefill``, ``ccl.decode``); the
   backend makes one specialization per length, the last of each list being ``ctx_len``.
"""

from __future__ import annotations

__all__ = ["CCLPass", "CCLOptions"]

import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from qeff.contract import COMP_CTX_LENGTHS, is_cache_input, is_retained_output
from qeff.errors import PassOptionError, UnsupportedGraphError
from qeff.passes.infra.base import INT32_MAX, QeffPass, QeffPassResult
from qeff.passes.ir.builder import GraphBuilder

logger = logging.getLogger(__name__)


def _lengths(help_text: str):
    return dataclasses.field(default=(), metadata={"help": help_text, "min": 1, "max": INT32_MAX})


@dataclasses.dataclass(frozen=True)
class CCLOptions:
    prefill: tuple[int, ...] = _lengths("compute context lengths of the prefill specializations (e.g. 512|1024)")
    decode: tuple[int, ...] = _lengths("compute context lengths of the decode specializations (e.g. 256|512|1024)")


def _fail(message: str, hint: str | None = None) -> UnsupportedGraphError:
    return UnsupportedGraphError(f"ccl: {message}", hint)


def _cache_length_reads(graph: ir.Graph) -> list[ir.Node]:
    """``Shape(cache input, start=2, end=3)``: kv's read of ctx_len for its slot range."""
    found = []
    for node in graph:
        if node.op_type != "Shape" or not node.inputs or node.inputs[0] is None:
            continue
        start, end = node.attributes.get("start"), node.attributes.get("end")
        if is_cache_input(node.inputs[0].name) and start is not None and end is not None \
                and (start.value, end.value) == (2, 3):
            found.append(node)
    return found


class CCLPass(QeffPass):
    """Read the cache only up to ``comp_ctx_lengths`` slots (see the module's rules)."""

    name = "ccl"
    summary = "compute context lengths: attention reads cache slots [0, comp_ctx_lengths) (new input)"
    Options = CCLOptions
    requires_passes = ("kv",)
    once = True

    def validate_options(self) -> None:
        for phase in ("prefill", "decode"):
            values = list(getattr(self.options, phase))
            if not values:
                raise PassOptionError(f"ccl: {phase} needs at least one length", f"e.g. ccl:{phase}=256|512|1024")
            if values != sorted(set(values)):
                raise PassOptionError(f"ccl: {phase} lengths {'|'.join(map(str, values))} must rise",
                                      f"e.g. ccl:{phase}=256|512|1024")

    def requires(self, model: ir.Model) -> None:
        if any(v.name == COMP_CTX_LENGTHS for v in model.graph.inputs):
            raise _fail(f"the model already has {COMP_CTX_LENGTHS}", "ccl runs once, after kv")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        reads = _cache_length_reads(graph)
        writes = [o.producer() for o in graph.outputs if is_retained_output(o.name) and o.producer() is not None
                  and o.producer().op_type == "ScatterND"]
        if not reads or not writes:
            raise _fail("no KV cache slot range or cache write found (kv's Shape(past_*)[2] and ScatterND)",
                        "run ccl right after kv, before fixed")
        lengths = ir.Value(name=COMP_CTX_LENGTHS, type=ir.TensorType(ir.DataType.INT64),
                           shape=ir.Shape([ir.SymbolicDim(COMP_CTX_LENGTHS)]))
        b = GraphBuilder(graph, model.opset_imports.get("", 17), "qeff_ccl")
        ccl = b.op("Shape", [lengths], {"start": 0, "end": 1}, "ccl")  # [1]
        for node in reads:
            ir.convenience.replace_all_uses_with(node.outputs[0], ccl)
        sliced = 0
        for write in writes:
            cache = write.outputs[0]
            uses = [u for u in cache.uses()]
            if not uses:
                continue
            window = b.op("Slice", [cache, b.i64(0), ccl, b.i64(2)], what="cache_read")
            for use in uses:
                use.node.replace_input_with(use.idx, window)
            sliced += 1
        graph.extend(b.tape.nodes)
        graph.inputs.append(lengths)
        TopologicalSortPass()(model)
        lists = {"prefill": list(self.options.prefill), "decode": list(self.options.decode)}
        logger.info("ccl: %d cache reads sliced; prefill %s, decode %s", sliced, lists["prefill"], lists["decode"])
        return QeffPassResult(model, True, details={"cache_reads": sliced, **lists}, manifest={"ccl": lists})
