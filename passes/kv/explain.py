"""``qeff-opt MODEL --explain kv``: what the kv matcher finds in each layer, without rewriting.

One row per attention site: its kind (decomposed core or ONNX ``Attention`` node), heads, KV
heads, head dim, scale, whether K is rotated by position (RoPE: a ``Mul`` between the K
projection and the cache write whose other operand is computed from ``position_ids``), the
visibility rule read from its mask (:mod:`.visibility`), its logit soft-cap (Gemma-2), whether it
has attention sinks (gpt-oss) and its score bias (ALiBi or none). Every Softmax or ``Attention``
node the matcher did not take is listed with its reason (an MoE router's Softmax, for one).
"""

from __future__ import annotations

__all__ = ["ExplainedSite", "explain_kv"]

import dataclasses

import onnx_ir as ir

from qeff.contract import POSITION_IDS
from qeff.passes.ir.traversal import ancestors
from qeff.passes.kv.match import AttentionSite, Rejection, match_attention
from qeff.passes.kv.bias import probe_biases
from qeff.passes.kv.probe import MAX_PROBE
from qeff.passes.kv.visibility import probe_visibility


@dataclasses.dataclass
class ExplainedSite:
    layer: int
    kind: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float | None
    rope: bool
    visibility: str
    bias: str
    softcap: float | None = None  # c of c · tanh(a · scores)
    sinks: bool = False  # a learned logit per head joined to the scores (gpt-oss)


def _rotated_by_position(site: AttentionSite, graph: ir.Graph) -> bool:
    """A Mul on K's path back to its projection MatMul whose other operand reads position_ids."""
    position = next((v for v in graph.inputs if v.name == POSITION_IDS), None)
    stack, seen = [site.key], set()
    while stack:
        x = stack.pop()
        p = x.producer() if x is not None else None
        if p is None or id(p) in seen or p.op_type in ("MatMul", "Gemm"):
            continue
        seen.add(id(p))
        if p.op_type == "Mul" and position is not None:
            for operand in p.inputs:
                if any(v is position for v in ancestors(operand, limit=200)):
                    return True
        stack.extend(i for i in p.inputs if i is not None)
    return False


def explain_kv(model: ir.Model, ctx_len: int = 256) -> tuple[list[ExplainedSite], list[Rejection], str]:
    """(one row per site, the rejected candidates, the matcher's one-line summary)."""
    found = match_attention(model)
    length = min(ctx_len + 1, MAX_PROBE)
    rules = probe_visibility(model, found.sites, length) if found.sites else None
    biases = probe_biases(model, found.sites, length)
    rows = []
    for s in found.sites:
        bias = str(biases[s.layer]) if s.layer in biases else "none"
        rows.append(ExplainedSite(
            layer=s.layer, kind=s.kind, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
            scale=s.scale, rope=_rotated_by_position(s, model.graph),
            visibility=str(rules[s.layer]) if rules else ("no mask" if s.mask is None else "not probed"),
            bias=bias, softcap=s.softcap[1] if s.softcap is not None else None, sinks=s.sinks is not None))
    return rows, found.rejected, found.explain()
