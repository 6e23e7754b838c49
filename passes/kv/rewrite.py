"""kv, rewriting: apply a :class:`~qeff.passes.kv.plan.Plan` (DESIGN §3.1).

Each attention core is rebuilt over the cache with the ops of :mod:`qeff.passes.kv.builder`;
the interface becomes the contract's (:mod:`qeff.contract`); the old cores, masks and
dynamic-cache I/O are removed as dead.
"""

from __future__ import annotations

__all__ = ["apply_plan"]

from typing import TYPE_CHECKING

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qeff.contract import (
    BATCH_INDEX,
    BATCH_SIZE,
    CTX_LEN,
    FULL_BATCH_SIZE,
    LOGITS,
    POSITION_IDS,
    SEQ_LEN,
    cache_input_name,
    retained_name,
)
from qeff.passes.kv.builder import KVGraphBuilder
from qeff.passes.kv.plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    from qeff.passes.kv.kv_pass import KVOptions

def _sym_shape(*dims) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])


def apply_plan(model: ir.Model, plan: Plan, options: KVOptions) -> None:
    graph = model.graph
    opset = model.opset_imports.get("", 17)
    b = KVGraphBuilder(graph, opset)
    batch_dim = BATCH_SIZE
    cache_batch = FULL_BATCH_SIZE if options.continuous_batching else batch_dim

    # Boundary values: the interface DESIGN §3.1 fixes.
    input_ids = plan.input_ids
    input_ids.shape = _sym_shape(batch_dim, SEQ_LEN)
    position_ids = plan.position_ids
    if position_ids is None:
        position_ids = ir.Value(name=POSITION_IDS, type=ir.TensorType(ir.DataType.INT64))
    position_ids.shape = _sym_shape(batch_dim, SEQ_LEN)
    batch_index = None
    if options.continuous_batching:
        batch_index = ir.Value(name=BATCH_INDEX, shape=_sym_shape(batch_dim, 1), type=ir.TensorType(ir.DataType.INT64))
    kv_type = ir.DataType.FLOAT16 if options.kv_dtype == "float16" else ir.DataType.FLOAT
    pasts = []
    for layer in plan.layers:
        s = layer.site
        for kind in ("key", "value"):
            pasts.append(ir.Value(
                name=cache_input_name(kind, s.layer), type=ir.TensorType(kv_type),
                shape=_sym_shape(cache_batch, s.n_kv_heads, CTX_LEN, s.head_dim),
            ))

    b.shared(input_ids, position_ids, pasts[0], batch_index)
    np_dtype = plan.compute_dtype.numpy()
    retained = []
    replacements: list[tuple[ir.Value, ir.Value]] = []
    for i, layer in enumerate(plan.layers):
        s = layer.site
        past_k, past_v = pasts[2 * i], pasts[2 * i + 1]
        k_new = b.to_bhsd(layer.new_key, s.key_layout, s.n_kv_heads, s.head_dim)
        v_new = b.to_bhsd(layer.new_value, s.value_layout, s.n_kv_heads, s.head_dim)
        k_ret = b.write_cache(past_k, k_new, s.n_kv_heads, retained_name(past_k.name))
        v_ret = b.write_cache(past_v, v_new, s.n_kv_heads, retained_name(past_v.name))
        retained += [k_ret, v_ret]
        k_all = b.repeat_heads(b.read_cache(k_ret, plan.compute_dtype, options.continuous_batching),
                               s.n_kv_heads, s.n_heads, s.head_dim)
        v_all = b.repeat_heads(b.read_cache(v_ret, plan.compute_dtype, options.continuous_batching),
                               s.n_kv_heads, s.n_heads, s.head_dim)
        query, scale = s.query, (s.scale if s.scale is not None else 1.0) / s.query_scale
        three_d = s.kind == "attention_op" and s.key_layout == "bsD"
        if three_d:  # [b, S, h*d] -> [b, h, S, d]
            query = b.op("Transpose", [b.op("Reshape", [query, b.i64(0, 0, s.n_heads, s.head_dim)])], {"perm": [0, 2, 1, 3]})
        biases = [b.alibi(layer.alibi_slopes, np_dtype)] if layer.alibi_slopes is not None else []
        out = b.attention(query, k_all, v_all, scale, biases, np_dtype, b.visibility(layer.window, layer.chunk), s.softcap,
                          s.sinks)
        if three_d:
            out = b.op("Reshape", [b.op("Transpose", [out], {"perm": [0, 2, 1, 3]}), b.i64(0, 0, s.n_heads * s.head_dim)])
        elif s.heads_folded:  # [b, h, S, d] -> [b*h, S, d], as the old core's bmm gave it
            out = b.op("Reshape", [out, b.op("Concat", [b.i64(-1), b.seq, b.i64(s.head_dim)], {"axis": 0})])
        old = s.output_matmul.outputs[0] if s.output_matmul is not None else s.attention_node.outputs[0]
        replacements.append((old, out))

    # Shape reads of removed inputs now read input_ids (batch, seq) or constants (heads, dim).
    for node, dims, layer in plan.shape_reads:
        pieces = [
            b.batch if dim == 0 else b.seq if layer is None
            else b.i64(layer.site.n_kv_heads if dim == 1 else layer.site.head_dim)
            for dim in dims
        ]
        if len(pieces) == 1:
            vector = pieces[0]
        else:  # several dims, or none (an empty Shape slice)
            vector = b.op("Concat", pieces, {"axis": 0}) if pieces else b.i64()
        replacements.append((node.outputs[0], vector))

    # Logits of the last valid token only.
    logits = plan.logits
    vocab = logits.shape[-1] if logits.shape is not None and isinstance(logits.shape[-1], int) else "vocab"
    if options.logits == "last":
        if plan.lm_head is not None:
            hidden = plan.lm_head.inputs[0]
            plan.lm_head.replace_input_with(0, b.last_token(hidden))
            for v in plan.lm_head_path:
                if v.shape is not None and len(v.shape) >= 2:
                    v.shape = ir.Shape([v.shape[0], 1, *v.shape[2:]])
        else:
            logits.name = "logits_all_tokens"
            gathered = b.last_token(logits)
            graph.outputs[graph.outputs.index(logits)] = gathered
            gathered.dtype = logits.dtype
            logits = gathered
            logits.name = LOGITS
    logits.shape = _sym_shape(batch_dim, 1 if options.logits == "last" else SEQ_LEN, vocab)

    graph.extend(b.tape.nodes)
    for old, new in replacements:
        ir.convenience.replace_all_uses_with(old, new)

    # The new interface; the old attention cores, masks and dynamic-cache I/O are now dead.
    graph.outputs.clear()
    graph.outputs.extend([logits, *retained])
    mask = plan.attention_mask
    dropped = {id(p) for layer in plan.layers for p in layer.past_inputs}
    kept_inputs = [v for v in graph.inputs if v is not mask and id(v) not in dropped
                   and v is not input_ids and v is not position_ids]
    graph.inputs.clear()
    graph.inputs.extend([input_ids, position_ids, *pasts, *kept_inputs])
    if batch_index is not None:
        graph.inputs.append(batch_index)
    RemoveUnusedNodesPass()(model)  # the old cores, masks, dynamic-cache concats, Shape reads
    TopologicalSortPass()(model)
