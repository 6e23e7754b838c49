"""kv, planning: find what to rewrite and check everything, before the model is touched.

``make_plan`` runs the attention matcher once, decides each layer's new K/V and bias, the
``ctx_len``, the lm_head to gather before, and which reads of removed inputs must be rebuilt;
anything the rewrite could not reproduce is refused here with one line naming the layer.
"""

from __future__ import annotations

__all__ = ["Layer", "Plan", "make_plan", "refuse_static_cache", "find_lm_head"]

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qeff.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, is_cache_input, is_retained_output
from qeff.errors import PassOptionError, UnsupportedGraphError
from qeff.passes.ir.constants import const_array, const_tensor
from qeff.passes.ir.traversal import needed_nodes
from qeff.passes.kv.bias import probe_biases
from qeff.passes.kv.positions import check_step_positions
from qeff.passes.kv.probe import MAX_PROBE
from qeff.passes.kv.visibility import probe_visibility
from qeff.passes.kv.match import AttentionSite, _layer_of, match_attention

if TYPE_CHECKING:  # pragma: no cover
    from qeff.passes.kv.kv_pass import KVOptions

logger = logging.getLogger(__name__)

# Ops between the lm_head MatMul and the logits output that act on each token on its own.
_PER_TOKEN_OPS = {"Cast", "Identity", "Tanh"}
_PER_TOKEN_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclasses.dataclass
class Layer:
    site: AttentionSite
    new_key: ir.Value  # this step's K, layout site.key_layout
    new_value: ir.Value
    past_inputs: list[ir.Value]  # dynamic-cache inputs this layer replaces
    present_outputs: list[ir.Value]
    alibi_slopes: np.ndarray | None
    window: int | None = None  # sliding window of the visibility the rewrite builds
    chunk: int | None = None  # or attention in blocks of this many positions
    visibility: str = "causal"  # the rule, as recorded in the manifest


@dataclasses.dataclass
class Plan:
    input_ids: ir.Value
    position_ids: ir.Value | None
    attention_mask: ir.Value | None
    layers: list[Layer]
    logits: ir.Value
    lm_head: ir.Node | None
    lm_head_path: list[ir.Value]  # values from lm_head output to logits (their dim 1 becomes 1)
    ctx_len: int
    compute_dtype: ir.DataType
    # Live Shape reads of removed inputs: (Shape node, dims it reads, layer of a dynamic-cache
    # past or None for attention_mask); the rewrite rebuilds them from input_ids.
    shape_reads: list[tuple[ir.Node, list[int], Layer | None]]


def _fail(message: str, hint: str | None = None) -> UnsupportedGraphError:
    return UnsupportedGraphError(f"kv: {message}", hint)


def refuse_static_cache(graph: ir.Graph) -> None:
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


def _implied_ctx_len(graph: ir.Graph, position_ids: ir.Value | None) -> int | None:
    """Rows of an absolute position table read with ``position_ids`` (GPT-2's wpe)."""
    if position_ids is None:
        return None
    rows = []
    for use in position_ids.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1:
            table = const_tensor(node.inputs[0])
            if table is not None and len(table.shape) == 2:
                rows.append(table.shape[0])
    return min(rows) if rows else None


def _find_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _describe_source(value: ir.Value) -> str:
    """What a value is, for a refusal: an initializer with its type, or the node producing it."""
    if value.is_initializer():
        tensor = value.const_value
        dims = list(tensor.shape) if tensor is not None else list(value.shape or [])
        dtype = tensor.dtype if tensor is not None else value.dtype
        return f"an initializer ({dtype.name if dtype is not None else 'unknown type'} {dims})"
    producer = value.producer()
    if producer is not None:
        label = f" {producer.name!r}" if producer.name else ""
        return f"the output of {producer.op_type} node{label}"
    return "a value that is not a graph input"


def _step_inputs(graph: ir.Graph) -> dict[str, ir.Value | None]:
    """input_ids, position_ids and attention_mask, each a graph input or None; refuses one
    that the graph holds some other way.

    The rewritten model takes these per step: position_ids places every token in the cache
    and builds the mask, attention_mask is dropped in favour of it. A constant in their place
    (an initializer, a ``Constant``, a graph input with an initializer default) has fixed
    every step's positions or padding at export time, which the cache cannot reproduce, and
    the new input would take the constant's name.
    """
    found: dict[str, ir.Value | None] = {}
    inputs = {v.name: v for v in graph.inputs}
    for name in (INPUT_IDS, POSITION_IDS, ATTENTION_MASK):
        value = inputs.get(name)
        if value is not None and value.is_initializer():
            raise _fail(f"{name} is a graph input with a constant default, {_describe_source(value)}",
                        f"export the model with {name} as a plain input, without an initializer of that name")
        if value is None:
            other = graph.initializers.get(name)
            if other is None:
                other = next((out for node in ir.traversal.RecursiveGraphIterator(graph)
                              for out in node.outputs if out.name == name), None)
            if other is not None:
                why = ("a mask fixed at export time cannot be replaced by the position mask"
                       if name == ATTENTION_MASK else f"the cached model takes {name} from the caller at every step")
                raise _fail(f"{name} is {_describe_source(other)}, not a graph input",
                            f"{why}; export the model with {name} as an input")
        found[name] = value
    position_ids = found[POSITION_IDS]
    if position_ids is not None:
        if position_ids.dtype is not None and position_ids.dtype != ir.DataType.INT64:
            raise _fail(f"position_ids is {position_ids.dtype.name}, not INT64",
                        "the cache slots are indexed with int64; export position_ids as int64")
    for name in (INPUT_IDS, POSITION_IDS):
        value = found[name]
        if value is not None and value.shape is not None and len(value.shape) != 2:
            raise _fail(f"{name} has rank {len(value.shape)} ({list(value.shape)}), not [batch, seq]",
                        "kv rewrites text decoders whose inputs are [batch, seq]")
    return found


def find_lm_head(logits: ir.Value) -> tuple[ir.Node | None, list[ir.Value]]:
    """The MatMul whose output reaches ``logits`` through per-token ops only, and the values
    on that path (lm_head output first)."""
    path = [logits]
    v = logits
    for _ in range(8):
        p = v.producer()
        if p is None:
            break
        if p.op_type in ("MatMul", "Gemm") and len(p.inputs) >= 2 and const_tensor(p.inputs[1]) is not None:
            if p.op_type == "Gemm":
                break  # Gemm is 2-D only; the gather after it would change its rank
            return p, list(reversed(path))
        if p.op_type in _PER_TOKEN_OPS and p.inputs:
            v = p.inputs[0]
        elif p.op_type in _PER_TOKEN_BINARY and len(p.inputs) == 2:
            a, b = p.inputs
            if const_array(b, max_elements=1) is not None:
                v = a
            elif const_array(a, max_elements=1) is not None:
                v = b
            else:
                break
        else:
            break
        path.append(v)
    return None, []


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


def _removed_inputs(attention_mask: ir.Value | None, layers: list[Layer], dynamic: bool):
    """Inputs the rewrite removes, each with the dims of its shape the new graph can still
    provide and its layer (None for attention_mask): attention_mask is [batch, seq] like
    input_ids (its dim 1 is past+seq in a dynamic-cache export); a dynamic-cache past keeps
    batch, heads and head_dim."""
    if attention_mask is not None:
        yield attention_mask, ({0} if dynamic else {0, 1}), None
    for layer in layers:
        for past in layer.past_inputs:
            yield past, {0, 1, 3}, layer


def _read_visibility(model: ir.Model, layers: list[Layer], options: KVOptions, ctx_len: int) -> None:
    """Each layer's visibility rule: the ``sliding_window`` option when given (an override),
    else the rule its mask shows on probe positions (:mod:`.visibility`); a rule the rewrite
    cannot build is refused, naming the layer."""
    if options.sliding_window is not None:
        for layer in layers:
            layer.window, layer.visibility = options.sliding_window, f"sliding window {options.sliding_window} (option)"
        return
    length = min(ctx_len + 1, MAX_PROBE)
    if length < ctx_len + 1:
        logger.warning("kv: the masks are probed on %d of the cache's %d positions: a sliding window or chunk "
                       "wider than %d would not be seen (pass sliding_window=N if the model has one)",
                       length, ctx_len + 1, length - 1)
    rules = probe_visibility(model, [layer.site for layer in layers], length)
    if rules is None:
        for layer in layers:
            layer.visibility = "causal (mask not probed)"
        return
    for layer in layers:
        rule = rules[layer.site.layer]
        if rule.kind == "other":
            raise _fail(f"layer {layer.site.layer}: its mask is not causal, a sliding window or chunked: "
                        f"{rule.detail} (probed on {length} positions)",
                        "kv rebuilds causal, sliding-window and chunked visibility only; this model is not supported")
        layer.window, layer.chunk = rule.window, rule.chunk
        layer.visibility = str(rule) + (f" (probed on {length} positions)" if length < ctx_len + 1 else "")


def _read_biases(model: ir.Model, layers: list[Layer], ctx_len: int) -> None:
    """Each biased layer's ALiBi slopes (:mod:`.bias`); any other bias is refused by layer."""
    length = min(ctx_len + 1, MAX_PROBE)
    rules = probe_biases(model, [layer.site for layer in layers], length)
    for layer in layers:
        rule = rules.get(layer.site.layer)
        if rule is None:
            continue
        if rule.slopes is None:
            raise _fail(f"layer {layer.site.layer}: an additive score bias that is not ALiBi "
                        f"({layer.site.bias[0].name}: {rule.detail})",
                        "only ALiBi biases can be recomputed for cache slots")
        layer.alibi_slopes = rule.slopes


def make_plan(model: ir.Model, options: KVOptions) -> Plan:
    graph = model.graph
    step = _step_inputs(graph)
    input_ids, position_ids, attention_mask = step[INPUT_IDS], step[POSITION_IDS], step[ATTENTION_MASK]
    if input_ids is None:
        raise _fail("the model has no input_ids input", "kv works on causal-LM exports (input_ids → logits)")
    logits = next((v for v in graph.outputs if v.name == LOGITS), graph.outputs[0] if graph.outputs else None)
    if logits is None:
        raise _fail("the model has no outputs")

    found = match_attention(model)
    sites = found.sites
    if not sites:
        raise _fail(f"no attention found: {found.explain()}",
                    "kv needs a decoder whose attention is MatMul→Softmax→MatMul or an ONNX Attention node")
    layer_ids = [s.layer for s in sites]
    # A Softmax rejected in a layer that has no site is that layer's attention, not matched
    # (a rejected Softmax inside a matched layer is something else, such as an MoE router).
    for rejection in found.rejected:
        if rejection.layer is not None and rejection.layer not in layer_ids:
            raise _fail(f"layer {rejection.layer}: attention not recognised: {rejection}",
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
        if len(site.bias) > 1:
            raise _fail(f"layer {site.layer}: {len(site.bias)} additive score biases")
        layers.append(Layer(site, new_key, new_value, past, present, None))

    heads = {(layer.site.n_kv_heads, layer.site.head_dim) for layer in layers}
    if len(heads) != 1:
        logger.info("layers differ in KV heads / head_dim: %s", sorted(heads))

    # ctx_len: given, or implied by a position table; never beyond that table.
    table_rows = _implied_ctx_len(graph, position_ids)
    ctx_len = options.ctx_len if options.ctx_len is not None else table_rows
    if ctx_len is None:
        raise PassOptionError("kv needs ctx_len (how many tokens the cache holds)",
                              "pass --ctx-len N or kv:ctx_len=N")
    if ctx_len < 1:  # a given ctx_len is bounded by its option; this is a table with no rows
        raise PassOptionError(f"kv: ctx_len={ctx_len} must be positive")
    if table_rows is not None and ctx_len > table_rows:
        raise PassOptionError(f"kv: ctx_len={ctx_len} exceeds the model's position table ({table_rows} positions)",
                              f"use ctx_len <= {table_rows}")
    seq_dim = input_ids.shape[1] if input_ids.shape is not None and len(input_ids.shape) == 2 else None
    if isinstance(seq_dim, int) and seq_dim > ctx_len:
        raise PassOptionError(f"kv: ctx_len={ctx_len} is smaller than the model's fixed sequence length {seq_dim}",
                              f"use ctx_len >= {seq_dim}")

    _read_visibility(model, layers, options, ctx_len)
    _read_biases(model, layers, ctx_len)

    # What survives the rewrite must not need attention_mask (except its shape) or the past.
    substitutes = {}
    for layer in layers:
        s = layer.site
        node = s.output_matmul if s.output_matmul is not None else s.attention_node
        substitutes[node] = [s.query, layer.new_key, layer.new_value]
    present_ids = {id(o) for layer in layers for o in layer.present_outputs}
    roots = [o for o in graph.outputs if id(o) not in present_ids]
    # The nodes the rewritten graph still runs: the attention cores read only Q and the new K/V.
    live = needed_nodes(graph, roots, lambda n: substitutes.get(n, n.inputs))
    check_step_positions(model, live, ctx_len, _layer_of)
    dynamic = any(layer.past_inputs for layer in layers)
    shape_reads = []
    for x, allowed, owner in _removed_inputs(attention_mask, layers, dynamic):
        for use in x.uses():
            if use.node not in live:
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
    lm_head, path = find_lm_head(logits) if options.logits == "last" else (None, [])
    compute = layers[0].site.query.dtype or ir.DataType.FLOAT
    return Plan(input_ids, position_ids, attention_mask, layers, logits, lm_head, path, ctx_len, compute,
                 shape_reads)
