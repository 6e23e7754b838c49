"""kv: insert a fixed-size KV cache kept on the device between steps (DESIGN §3.1)."""

from __future__ import annotations

__all__ = ["KVPass", "KVOptions"]

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qeff.errors import PassOptionError, UnsupportedGraphError
from qeff.passes.kv.match import (
    AttentionSite,
    _ancestors,
    _const_array,
    _const_tensor,
    _layer_of,
    explain_no_match,
    find_attention_sites,
    rejected_candidates,
)
from qeff.contract import (
    ATTENTION_MASK,
    BATCH_INDEX,
    BATCH_SIZE,
    CTX_LEN,
    FULL_BATCH_SIZE,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    SEQ_LEN,
    KVLayout,
    cache_input_name,
    is_cache_input,
    is_retained_output,
    retained_name,
)
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.kv.builder import KVGraphBuilder

logger = logging.getLogger(__name__)

# Ops between the lm_head MatMul and the logits output that act on each token on its own.
_PER_TOKEN_OPS = {"Cast", "Identity", "Tanh"}
_PER_TOKEN_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclasses.dataclass(frozen=True)
class KVOptions:
    ctx_len: int | None = dataclasses.field(
        default=None,
        metadata={"help": "cache length (slots per sequence); required unless a position table implies it"},
    )
    continuous_batching: bool = dataclasses.field(
        default=False, metadata={"help": "add a batch_index input; the cache batch dim becomes full_batch_size"}
    )
    full_batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": "cache rows with continuous batching (recorded for the compiler)"}
    )
    kv_dtype: Literal["float32", "float16"] = dataclasses.field(
        default="float32", metadata={"help": "dtype of the cache inputs/outputs"}
    )
    logits: Literal["last", "all"] = dataclasses.field(
        default="last", metadata={"help": "logits of the last valid token only, or of every token"}
    )
    sliding_window: int | None = dataclasses.field(
        default=None, metadata={"help": "attend only to the last N positions (Mistral-style); none = full"}
    )
    prefill_len: int = dataclasses.field(
        default=32, metadata={"help": "seq_len of the prefill specialization suggested in the manifest"}
    )


@dataclasses.dataclass
class _Layer:
    site: AttentionSite
    new_key: ir.Value  # this step's K, layout site.key_layout
    new_value: ir.Value
    past_inputs: list[ir.Value]  # dynamic-cache inputs this layer replaces
    present_outputs: list[ir.Value]
    alibi_slopes: np.ndarray | None


@dataclasses.dataclass
class _Plan:
    input_ids: ir.Value
    position_ids: ir.Value | None
    attention_mask: ir.Value | None
    layers: list[_Layer]
    logits: ir.Value
    lm_head: ir.Node | None
    lm_head_path: list[ir.Value]  # values from lm_head output to logits (their dim 1 becomes 1)
    ctx_len: int
    compute_dtype: ir.DataType
    # Live Shape reads of removed inputs: (Shape node, dims it reads, layer of a dynamic-cache
    # past or None for attention_mask); the rewrite rebuilds them from input_ids.
    shape_reads: list[tuple[ir.Node, list[int], _Layer | None]]


class KVPass(QeffPass):
    """Give a plain causal-LM export a fixed-size KV cache that stays on the device.

    Rules:
    1. Attention sites come from :mod:`qeff.passes.kv.match` (the attention core or an ONNX
       ``Attention`` node). Every site is rebuilt over the whole cache: its K (after RoPE) and
       V, before GQA repetition, are written with ``ScatterND`` into the layer's key and value
       cache inputs ``[batch, n_kv, ctx_len, head_dim]`` at slot ``position_id``; the result is
       output as the matching retained-state output and read back (repeated to all heads) by a new
       core ``softmax(where(c <= p, q·kᵀ·scale + bias, min)) · v``. Pads (``position_id < 0``)
       write back the old value of a slot no valid token of their row writes.
    2. The mask comes from ``position_ids`` alone; ``attention_mask`` is removed and any
       ``Shape(attention_mask)`` left (dynamo builds reshape targets from it) reads
       ``input_ids`` instead, which has the same shape.
    3. ALiBi (MPT) is recomputed for cache slots from the slopes in the graph's ALiBi table.
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

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = _make_plan(model, self.options)
        _apply(model, plan, self.options)
        layers = plan.layers
        details = {
            "layers": len(layers),
            "n_heads": layers[0].site.n_heads,
            "n_kv_heads": layers[0].site.n_kv_heads,
            "head_dim": layers[0].site.head_dim,
            "ctx_len": plan.ctx_len,
            "site_kinds": sorted({layer.site.kind for layer in layers}),
            "dynamic_cache_converted": any(layer.past_inputs for layer in layers),
        }
        logger.info("kv: %d layers, ctx_len %d", len(layers), plan.ctx_len)
        return QeffPassResult(model, True, details=details, manifest=self._manifest(model, plan))

    def _manifest(self, model: ir.Model, plan: _Plan) -> dict[str, Any]:
        """The KV layout, retained-state names and suggested specializations (DESIGN §3.1)."""
        o, ctx, site = self.options, plan.ctx_len, plan.layers[0].site
        prefill = {BATCH_SIZE: 1, SEQ_LEN: min(o.prefill_len, ctx), CTX_LEN: ctx}
        decode = {BATCH_SIZE: 1, SEQ_LEN: 1, CTX_LEN: ctx}
        if o.continuous_batching and o.full_batch_size:
            prefill[FULL_BATCH_SIZE] = decode[FULL_BATCH_SIZE] = o.full_batch_size
            decode[BATCH_SIZE] = o.full_batch_size
        layout = KVLayout(layers=len(plan.layers), n_kv_heads=site.n_kv_heads, head_dim=site.head_dim,
                          dtype=o.kv_dtype, continuous_batching=o.continuous_batching,
                          full_batch_size=o.full_batch_size, logits=o.logits)
        return {"kv": layout, "retained_state": [v.name for v in model.graph.outputs if is_retained_output(v.name)],
                "ctx_len": ctx, "specializations": [prefill, decode]}


# --- planning: every check happens here, before the model is touched ------------------------


def _fail(message: str, hint: str | None = None) -> UnsupportedGraphError:
    return UnsupportedGraphError(f"kv: {message}", hint)


def _refuse_static_cache(graph: ir.Graph) -> None:
    names = [v.name for v in graph.inputs if is_cache_input(v.name)]
    names += [v.name for v in graph.outputs if is_retained_output(v.name)]
    inputs = {id(v) for v in graph.inputs}
    for node in graph:
        if node.op_type == "ScatterND" and node.inputs and node.inputs[0] is not None and id(node.inputs[0]) in inputs:
            names.append(node.inputs[0].name)
    if names:
        raise _fail(
            f"the model already has a static KV cache ({names[0]})",
            "it is ready for the next passes (fixed, fp16clip, mx*); run kv on the plain export",
        )


def _dynamic_cache_split(v: ir.Value, graph: ir.Graph) -> tuple[ir.Value, list[ir.Value], list[ir.Value]] | None:
    """``v = Concat(past_input, new, axis=2)`` (dynamic cache) -> (new, [past], [present outputs])."""
    p = v.producer()
    if p is None or p.op_type != "Concat" or len(p.inputs) != 2:
        return None
    axis = p.attributes.get("axis")
    if axis is None or axis.value not in (2, -2):
        return None
    inputs = {id(x) for x in graph.inputs}
    past, new = p.inputs
    if past is None or id(past) not in inputs:
        return None
    presents = [o for o in graph.outputs if o is v]
    return new, [past], presents


def _alibi_slopes(site: AttentionSite, term: ir.Value) -> np.ndarray | None:
    """Per-head slopes of an ALiBi table in ``term``'s ancestry: a constant with a dim of
    ``n_heads`` that grows linearly along its last axis."""
    for x in _ancestors(term):
        t = _const_tensor(x)
        shape = tuple(t.shape) if t is not None else ()
        if len(shape) < 2 or shape[-1] < 2 or site.n_heads not in shape:
            continue  # decided from the shape alone: no other constant is read
        arr = _const_array(x)
        if arr is None:
            continue
        arr = np.asarray(arr, dtype=np.float64)
        steps = np.diff(arr, axis=-1)
        if not np.allclose(steps, steps[..., :1], rtol=1e-5, atol=1e-6):
            continue
        slopes = steps[..., 0].reshape(-1)
        if slopes.size == site.n_heads:
            return slopes
    return None


def _implied_ctx_len(graph: ir.Graph, position_ids: ir.Value | None) -> int | None:
    """Rows of an absolute position table read with ``position_ids`` (GPT-2's wpe)."""
    if position_ids is None:
        return None
    rows = []
    for use in position_ids.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1:
            table = _const_tensor(node.inputs[0])
            if table is not None and len(table.shape) == 2:
                rows.append(table.shape[0])
    return min(rows) if rows else None


def _find_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _lm_head(logits: ir.Value) -> tuple[ir.Node | None, list[ir.Value]]:
    """The MatMul whose output reaches ``logits`` through per-token ops only, and the values
    on that path (lm_head output first)."""
    path = [logits]
    v = logits
    for _ in range(8):
        p = v.producer()
        if p is None:
            break
        if p.op_type in ("MatMul", "Gemm") and len(p.inputs) >= 2 and _const_tensor(p.inputs[1]) is not None:
            if p.op_type == "Gemm":
                break  # Gemm is 2-D only; the gather after it would change its rank
            return p, list(reversed(path))
        if p.op_type in _PER_TOKEN_OPS and p.inputs:
            v = p.inputs[0]
        elif p.op_type in _PER_TOKEN_BINARY and len(p.inputs) == 2:
            a, b = p.inputs
            if _const_array(b, max_elements=1) is not None:
                v = a
            elif _const_array(a, max_elements=1) is not None:
                v = b
            else:
                break
        else:
            break
        path.append(v)
    return None, []


def _live_nodes(graph: ir.Graph, roots: list[ir.Value], substitutes: dict[int, list[ir.Value]]) -> set[int]:
    """Nodes reachable upwards from ``roots`` once each node in ``substitutes`` reads the listed
    values instead of its own inputs (i.e. after the attention cores are replaced)."""
    live: set[int] = set()
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        if p is None:
            continue
        live.add(id(p))
        stack.extend(substitutes.get(id(p), p.inputs))
        for attr in p.attributes.values():  # values captured by subgraphs
            if attr.type == ir.AttributeType.GRAPH:
                for n in attr.value:
                    stack.extend(n.inputs)
    return live


def _shape_dims(node: ir.Node, x: ir.Value) -> list[int] | None:
    """The dims of ``x`` a ``Shape`` node reads (its start/end), or None for any other node."""
    if node.op_type != "Shape" or x.shape is None:
        return None
    rank = len(x.shape)
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    lo = start.value if start is not None else 0
    hi = end.value if end is not None else rank
    lo, hi = (lo + rank if lo < 0 else lo), (hi + rank if hi < 0 else hi)
    return list(range(max(0, lo), min(rank, hi)))


def _removed_inputs(attention_mask: ir.Value | None, layers: list[_Layer], dynamic: bool):
    """Inputs the rewrite removes, each with the dims of its shape the new graph can still
    provide and its layer (None for attention_mask): attention_mask is [batch, seq] like
    input_ids (its dim 1 is past+seq in a dynamic-cache export); a dynamic-cache past keeps
    batch, heads and head_dim."""
    if attention_mask is not None:
        yield attention_mask, ({0} if dynamic else {0, 1}), None
    for layer in layers:
        for past in layer.past_inputs:
            yield past, {0, 1, 3}, layer


def _make_plan(model: ir.Model, options: KVOptions) -> _Plan:
    graph = model.graph
    _refuse_static_cache(graph)
    input_ids = _find_input(graph, INPUT_IDS)
    if input_ids is None:
        raise _fail("the model has no input_ids input", "kv works on causal-LM exports (input_ids → logits)")
    position_ids = _find_input(graph, POSITION_IDS)
    attention_mask = _find_input(graph, ATTENTION_MASK)
    logits = next((v for v in graph.outputs if v.name == LOGITS), graph.outputs[0] if graph.outputs else None)
    if logits is None:
        raise _fail("the model has no outputs")

    sites = find_attention_sites(model)
    if not sites:
        raise _fail(f"no attention found: {explain_no_match(model)}",
                    "kv needs a decoder whose attention is MatMul→Softmax→MatMul or an ONNX Attention node")
    layer_ids = [s.layer for s in sites]
    # A Softmax rejected in a layer that has no site is that layer's attention, not matched
    # (a rejected Softmax inside a matched layer is something else, such as an MoE router).
    for layer, why in rejected_candidates(model):
        if layer is not None and layer not in layer_ids:
            raise _fail(f"layer {layer}: attention not recognised: {why}",
                        "kv needs MatMul → [scale] → [mask] → Softmax → MatMul or an ONNX Attention node per layer")
    if sorted(layer_ids) != list(range(len(sites))):
        raise _fail(f"attention sites found for layers {layer_ids}, expected 0..{len(sites) - 1}",
                    "some layer's attention was not recognised; run with --debug for the matcher's log")

    layers = []
    for site in sites:
        if site.attention_node is not None:
            softcap = site.attention_node.attributes.get("softcap")
            if softcap is not None and softcap.value:
                raise _fail(f"layer {site.layer}: Attention with softcap is not supported")
            extra = [o for o in site.attention_node.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
            if extra:
                raise _fail(f"layer {site.layer}: Attention node outputs its own cache ({extra[0].name})")
        new_key, new_value, past, present = site.key, site.value, [], []
        split_k = _dynamic_cache_split(site.key, graph)
        split_v = _dynamic_cache_split(site.value, graph)
        if (split_k is None) != (split_v is None):
            raise _fail(f"layer {site.layer}: only one of K/V comes from a dynamic cache")
        if split_k is not None:
            new_key, past, present = split_k[0], split_k[1], split_k[2]
            new_value, past, present = split_v[0], past + split_v[1], present + split_v[2]
        slopes = None
        for term in site.bias:
            slopes = _alibi_slopes(site, term)
            if slopes is None:
                raise _fail(f"layer {site.layer}: an additive score bias that is not ALiBi ({term.name})",
                            "only ALiBi biases can be recomputed for cache slots")
        if len(site.bias) > 1:
            raise _fail(f"layer {site.layer}: {len(site.bias)} additive score biases")
        layers.append(_Layer(site, new_key, new_value, past, present, slopes))

    heads = {(layer.site.n_kv_heads, layer.site.head_dim) for layer in layers}
    if len(heads) != 1:
        logger.info("layers differ in KV heads / head_dim: %s", sorted(heads))

    # ctx_len: given, or implied by a position table; never beyond that table.
    table_rows = _implied_ctx_len(graph, position_ids)
    ctx_len = options.ctx_len if options.ctx_len is not None else table_rows
    if ctx_len is None:
        raise PassOptionError("kv needs ctx_len (how many tokens the cache holds)",
                              "pass --ctx-len N or kv:ctx_len=N")
    if ctx_len < 1:
        raise PassOptionError(f"kv: ctx_len={ctx_len} must be positive")
    if table_rows is not None and ctx_len > table_rows:
        raise PassOptionError(f"kv: ctx_len={ctx_len} exceeds the model's position table ({table_rows} positions)",
                              f"use ctx_len <= {table_rows}")
    seq_dim = input_ids.shape[1] if input_ids.shape is not None and len(input_ids.shape) == 2 else None
    if isinstance(seq_dim, int) and seq_dim > ctx_len:
        raise PassOptionError(f"kv: ctx_len={ctx_len} is smaller than the model's fixed sequence length {seq_dim}",
                              f"use ctx_len >= {seq_dim}")
    if options.sliding_window is not None and options.sliding_window < 1:
        raise PassOptionError("kv: sliding_window must be positive")

    # What survives the rewrite must not need attention_mask (except its shape) or the past.
    substitutes = {}
    for layer in layers:
        s = layer.site
        node = s.output_matmul if s.output_matmul is not None else s.attention_node
        substitutes[id(node)] = [s.query, layer.new_key, layer.new_value]
    present_ids = {id(o) for layer in layers for o in layer.present_outputs}
    roots = [o for o in graph.outputs if id(o) not in present_ids]
    live = _live_nodes(graph, roots, substitutes)
    dynamic = any(layer.past_inputs for layer in layers)
    shape_reads = []
    for x, allowed, owner in _removed_inputs(attention_mask, layers, dynamic):
        for use in x.uses():
            if id(use.node) not in live:
                continue
            dims = _shape_dims(use.node, x)
            if dims is not None and set(dims) <= allowed:
                shape_reads.append((use.node, dims, owner))  # its shape survives the rewrite
                continue
            where = _layer_of(use.node)
            at = f" in layer {where}" if where is not None else ""
            what = f"dims {dims} of its shape" if dims is not None else "its values"
            raise _fail(
                f"{x.name} is still needed ({what}, by {use.node.op_type} {use.node.name!r}{at}) outside the attention cores",
                "the model uses it for something other than attention; export it without that use",
            )
    lm_head, path = _lm_head(logits) if options.logits == "last" else (None, [])
    compute = layers[0].site.query.dtype or ir.DataType.FLOAT
    return _Plan(input_ids, position_ids, attention_mask, layers, logits, lm_head, path, ctx_len, compute,
                 shape_reads)


# --- rewriting ----------------------------------------------------------------------------


def _sym_shape(*dims) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])


def _apply(model: ir.Model, plan: _Plan, options: KVOptions) -> None:
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

    b.shared(input_ids, position_ids, pasts[0], batch_index, options.sliding_window)
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
        out = b.attention(query, k_all, v_all, scale, biases, np_dtype)
        if three_d:
            out = b.op("Reshape", [b.op("Transpose", [out], {"perm": [0, 2, 1, 3]}), b.i64(0, 0, s.n_heads * s.head_dim)])
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
