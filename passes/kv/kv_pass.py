"""kv: insert a fixed-size KV cache kept on the device between steps (DESIGN §3.1).

The pass is match (:mod:`.match`) → plan (:mod:`.plan`, where every check happens) → rewrite
(:mod:`.rewrite`, with the ops of :mod:`.builder`)."""

from __future__ import annotations

__all__ = ["KVPass", "KVOptions"]

import dataclasses
import logging
from typing import Any, Literal

import onnx_ir as ir

from qeff.contract import BATCH_SIZE, CTX_LEN, FULL_BATCH_SIZE, SEQ_LEN, KVLayout, is_retained_output
from qeff.passes.infra.base import INT32_MAX, QeffPass, QeffPassResult
from qeff.passes.kv.plan import Plan, make_plan, refuse_static_cache
from qeff.passes.kv.rewrite import apply_plan

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KVOptions:
    ctx_len: int | None = dataclasses.field(
        default=None,
        metadata={"help": "cache length (slots per sequence); required unless a position table implies it",
                  "min": 1, "max": INT32_MAX},
    )
    continuous_batching: bool = dataclasses.field(
        default=False, metadata={"help": "add a batch_index input; the cache batch dim becomes full_batch_size"}
    )
    full_batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": "cache rows with continuous batching (recorded for the compiler)",
                                "min": 1, "max": INT32_MAX}
    )
    kv_dtype: Literal["float32", "float16"] = dataclasses.field(
        default="float32", metadata={"help": "dtype of the cache inputs/outputs"}
    )
    logits: Literal["last", "all"] = dataclasses.field(
        default="last", metadata={"help": "logits of the last valid token only, or of every token"}
    )
    sliding_window: int | None = dataclasses.field(
        default=None, metadata={"help": "attend only to the last N positions (Mistral-style); none = full",
                                "min": 1, "max": INT32_MAX}
    )
    prefill_len: int = dataclasses.field(
        default=32, metadata={"help": "seq_len of the prefill specialization suggested in the manifest",
                              "min": 1, "max": INT32_MAX}
    )


def _runs(rules: list[str]) -> str:
    """``causal`` for every layer alike, else ``layers 0-4: …; 5: …`` (the report's one line)."""
    groups: list[tuple[int, int, str]] = []
    for i, rule in enumerate(rules):
        if groups and groups[-1][2] == rule:
            groups[-1] = (groups[-1][0], i, rule)
        else:
            groups.append((i, i, rule))
    if len(groups) == 1:
        return rules[0]
    return "; ".join(f"{a}{'-' + str(b) if b > a else ''}: {rule}" for a, b, rule in groups)


class KVPass(QeffPass):
    """Give a plain causal-LM export a fixed-size KV cache that stays on the device.

    Rules:
    1. Attention sites come from :mod:`qeff.passes.kv.match` (the attention core or an ONNX
       ``Attention`` node). Every site is rebuilt over the whole cache: its K (after RoPE) and
       V, before GQA repetition, are written with ``ScatterND`` into the layer's key and value
       cache inputs ``[batch, n_kv, ctx_len, head_dim]`` at slot ``position_id``; the result is
       output as the matching retained-state output and read back (repeated to all heads) by a new
       core ``softmax(where(c <= p, q·kᵀ·scale + bias, min)) · v``. Pads (``position_id < 0``)
       repeat their row's last valid write (same slot, same K/V), or write slot 0's old value
       back when the row has none, so duplicate writes are identical in any order.
    2. Each layer's visibility rule is read from its mask on probe positions
       (:mod:`.visibility`): causal, a sliding window (the ``sliding_window`` option
       overrides it for every layer) or chunked attention; any other rule is refused, naming
       the layer. The rule
       per layer goes into the manifest (``kv.visibility``).
       The mask comes from ``position_ids`` alone; ``attention_mask`` is removed and any
       ``Shape(attention_mask)`` left (dynamo builds reshape targets from it) reads
       ``input_ids`` instead, which has the same shape.
    3. ALiBi is recomputed for cache slots from per-head slopes read by evaluating the bias on
       probe positions (BLOOM computes it from the attention mask), else from a constant ALiBi
       table (MPT) (:mod:`.bias`); any other bias is refused, naming the layer.
    4. ``logits=last`` gathers the hidden state of each row's last valid token (argmax of
       ``position_ids``) before the lm_head MatMul, so the vocabulary projection runs once.
    5. Inputs become ``input_ids, position_ids``, the key and value cache of each layer in
       layer order (and ``batch_index``); outputs ``logits`` and the retained states in the same
       order. The names are the contract's (:mod:`qeff.contract`).
       A model without ``position_ids`` (ALiBi) gets one.
    6. A dynamic-cache export (``Concat(past, new)`` per layer) is converted: the concat is
       bypassed and its past inputs and present outputs are removed.
    7. Refused, before anything changes: a graph without recognisable attention, a graph
       that already has the static cache, an ``attention_mask`` still needed outside the
       attention cores, a score bias that is not ALiBi, ``ctx_len`` missing or too small.
    """

    name = "kv"
    summary = "insert a fixed-size KV cache (ScatterND at position_ids, position mask, last-token logits)"
    Options = KVOptions
    once = True

    def requires(self, model: ir.Model) -> None:
        """A plain export: a model that already has the static cache is refused."""
        refuse_static_cache(model.graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = make_plan(model, self.options)
        apply_plan(model, plan, self.options)
        layers = plan.layers
        details = {
            "layers": len(layers),
            "n_heads": layers[0].site.n_heads,
            "n_kv_heads": layers[0].site.n_kv_heads,
            "head_dim": layers[0].site.head_dim,
            "ctx_len": plan.ctx_len,
            "site_kinds": sorted({layer.site.kind for layer in layers}),
            "dynamic_cache_converted": any(layer.past_inputs for layer in layers),
            "visibility": _runs([layer.visibility for layer in layers]),
        }
        logger.info("kv: %d layers, ctx_len %d", len(layers), plan.ctx_len)
        return QeffPassResult(model, True, details=details, manifest=self._manifest(model, plan))

    def _manifest(self, model: ir.Model, plan: Plan) -> dict[str, Any]:
        """The KV layout, retained-state names and suggested specializations (DESIGN §3.1)."""
        o, ctx, site = self.options, plan.ctx_len, plan.layers[0].site
        prefill = {BATCH_SIZE: 1, SEQ_LEN: min(o.prefill_len, ctx), CTX_LEN: ctx}
        decode = {BATCH_SIZE: 1, SEQ_LEN: 1, CTX_LEN: ctx}
        if o.continuous_batching and o.full_batch_size:
            prefill[FULL_BATCH_SIZE] = decode[FULL_BATCH_SIZE] = o.full_batch_size
            decode[BATCH_SIZE] = o.full_batch_size
        layout = KVLayout(layers=len(plan.layers), n_kv_heads=site.n_kv_heads, head_dim=site.head_dim,
                          dtype=o.kv_dtype, continuous_batching=o.continuous_batching,
                          full_batch_size=o.full_batch_size, logits=o.logits,
                          visibility=[layer.visibility for layer in plan.layers])
        return {"kv": layout, "retained_state": [v.name for v in model.graph.outputs if is_retained_output(v.name)],
                "ctx_len": ctx, "specializations": [prefill, decode]}
