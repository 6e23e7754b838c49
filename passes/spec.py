"""spec: make a KV model the target of speculative decoding (QEfficient's contract).

A speculative step sends the last accepted token plus K proposed ones (``seq_len = K + 1``) and
needs the target's logits at each of those positions, to accept the longest run of proposals
it agrees with. After ``kv`` the model returns the logits of each row's last valid token only;
this pass makes it return the last ``k`` positions' instead, with ``k`` read from a new input.

Rules:
1. A new input ``num_logits_to_keep`` (int64 ``[num_logits_to_keep, 1]``); only its first dim
   is read, as QEfficient's runner and the Cloud AI vLLM plugin send it.
2. ``logits`` becomes ``[batch_size, num_logits_to_keep, vocab]``: the positions
   ``lower … lower + k - 1`` of each row, where ``last = argmax(position_ids)`` (the row's last
   valid token), ``lower = max(last + 1 - k, 0)``; an index past the step's length reads its
   last token (a prefill shorter than ``k``). Pads (``position_ids = -1``) among them return
   logits the caller ignores.
3. The gather sits before the lm_head MatMul, replacing kv's last-token gather, so the
   vocabulary projection runs ``k`` times per row, not ``seq_len`` times.
4. Requires ``kv`` with ``logits=last`` (refused otherwise, one line). The manifest records
   ``spec.k``; the backend turns it into specializations: prefill with
   ``num_logits_to_keep = 1``, one decode per K with ``seq_len = num_logits_to_keep = K + 1``.
"""

from __future__ import annotations

__all__ = ["SpecPass", "SpecOptions"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qeff.contract import BATCH_SIZE, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, POSITION_IDS
from qeff.errors import UnsupportedGraphError
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.ir.builder import GraphBuilder
from qeff.passes.kv.plan import find_lm_head

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    k: tuple[int, ...] = dataclasses.field(
        default=(3,), metadata={"help": "proposals per decode step, one decode specialization each (3|7)",
                                "min": 1, "max": 1024})


def _fail(message: str, hint: str | None = None) -> UnsupportedGraphError:
    return UnsupportedGraphError(f"spec: {message}", hint)


def _input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _reads_last_position(indices: ir.Value, position_ids: ir.Value) -> bool:
    """kv's last-token index: ArgMax over position_ids, unsqueezed (and nothing else)."""
    v = indices
    for _ in range(4):
        p = v.producer()
        if p is None:
            return False
        if p.op_type == "ArgMax":
            return p.inputs[0] is position_ids
        if p.op_type not in ("Unsqueeze", "Reshape", "Identity"):
            return False
        v = p.inputs[0]
    return False


class SpecPass(QeffPass):
    """Return the logits of the last ``num_logits_to_keep`` positions (see the module's rules)."""

    name = "spec"
    summary = "speculative-decoding target: logits of the last num_logits_to_keep positions (new input)"
    Options = SpecOptions
    requires_passes = ("kv",)
    once = True

    def validate_options(self) -> None:
        if not self.options.k:
            raise _fail("k needs at least one value", "e.g. spec:k=3 or spec:k=3|7")

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        if _input(graph, NUM_LOGITS_TO_KEEP) is not None:
            raise _fail(f"the model already has {NUM_LOGITS_TO_KEEP}", "spec runs once, after kv")
        if _input(graph, POSITION_IDS) is None or _input(graph, INPUT_IDS) is None:
            raise _fail("the model has no input_ids/position_ids inputs", "run kv first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        position_ids = _input(graph, POSITION_IDS)
        logits = next((v for v in graph.outputs if v.name == LOGITS), None)
        if logits is None:
            raise _fail("the model has no logits output")
        lm_head, path = find_lm_head(logits)
        gather = lm_head.inputs[0].producer() if lm_head is not None else None
        batch_dims = gather.attributes.get("batch_dims") if gather is not None else None
        if gather is None or gather.op_type != "GatherND" or batch_dims is None or batch_dims.value != 1 \
                or not _reads_last_position(gather.inputs[1], position_ids):
            raise _fail("the lm_head does not read the last valid token's hidden state (kv with logits=last)",
                        "run kv with logits=last (the default) before spec")
        hidden = gather.inputs[0]

        b = GraphBuilder(graph, model.opset_imports.get("", 17), "qeff_spec")
        keep = ir.Value(name=NUM_LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64),
                        shape=ir.Shape([ir.SymbolicDim(NUM_LOGITS_TO_KEEP), 1]))
        k = b.op("Shape", [keep], {"start": 0, "end": 1}, "k")  # [1]
        seq = b.op("Shape", [hidden], {"start": 1, "end": 2}, "seq")  # [1]
        last = b.op("ArgMax", [position_ids], {"axis": 1, "keepdims": 1}, "last")  # [b, 1]
        lower = b.op("Max", [b.op("Sub", [b.op("Add", [last, b.i64(1)]), k]), b.i64(0)], what="lower")
        steps = b.op("Range", [b.const(np.int64(0)), b.op("Squeeze", [k, b.i64(0)]), b.const(np.int64(1))])
        index = b.op("Min", [b.op("Add", [lower, b.unsqueeze(steps, 0)]), b.op("Sub", [seq, b.i64(1)])],
                     what="kept_positions")  # [b, k]
        kept = b.op("GatherND", [hidden, b.unsqueeze(index, 2)], {"batch_dims": 1}, "kept_states")  # [b, k, H]
        graph.extend(b.tape.nodes)
        lm_head.replace_input_with(0, kept)
        for v in path:
            if v.shape is not None and len(v.shape) >= 2:
                v.shape = ir.Shape([v.shape[0], ir.SymbolicDim(NUM_LOGITS_TO_KEEP), *v.shape[2:]])
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([ir.SymbolicDim(BATCH_SIZE), ir.SymbolicDim(NUM_LOGITS_TO_KEEP), logits.shape[2]])
        graph.inputs.append(keep)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        ks = sorted(set(self.options.k))
        logger.info("spec: logits of the last num_logits_to_keep positions; decode specializations K=%s", ks)
        return QeffPassResult(model, True, details={"k": ks, "decode_seq_len": [x + 1 for x in ks]},
                              manifest={"spec": {"k": ks}})
