"""attention: find and describe the attention sites of a causal-LM graph (read-only).

This is the matcher the ``kv`` pass builds on. It never modifies the model it is given; when
a graph lacks shapes (TorchScript exports) shape inference runs on a *copy* and the inferred
shapes are only read back by value name.

Rules:
1. Every ``Softmax`` over the last axis anchors a candidate *decomposed* site. Its output must
   reach the A input of a MatMul (the output MatMul), directly or through ``Cast``,
   ``Identity``, ``Dropout`` or a NaN guard ``Where(IsNaN(p), 0, p)``. A core that runs with
   its heads folded into the batch (``bmm`` over ``[b*h, S, d]``, BLOOM) is taken when one
   ``Reshape`` unfolds the scores to ``[b, h, S, T]`` before the Softmax and one folds them
   back after it, each keeping the last two dims; its query is the ``[b, h, S, d]`` value the
   folded one was reshaped from.
2. From the Softmax input the matcher walks up through ``Cast``/``Identity``, ``Add`` (one
   side leads to the score MatMul, the other is an additive term), ``Where`` (masked_fill:
   the condition is the mask) and ``Mul``/``Div`` by a constant scalar (the scale) to a MatMul
   whose output has rank 4 (the score MatMul). Which side of an ``Add`` leads to the scores is
   decided by reachability of a MatMul, never by input position.
3. An additive term is the *mask* when its ancestry holds a big negative constant (≤ -1e4 or
   -inf) or, failing that, when it depends on the ``attention_mask`` input through data (not
   through ``Shape``); any other term is a *bias* (ALiBi in MPT).
4. K and V are found by walking up from the score MatMul's B input and the output MatMul's B
   input through layout and repetition ops (``Transpose, Reshape, Expand, Unsqueeze, Squeeze,
   Tile, Cast, Identity``) and constant-scalar ``Mul``/``Div`` (pre-scaling, folded into the
   scale). The topmost value of that chain whose shape is ``[b, h_kv, S, d]`` (``S`` the
   scores' key length, ``h_kv`` dividing ``n_heads``, ``d`` the query's head dim) is the K/V
   before GQA repetition. When the chain never holds that layout (GPT-2: ``[b, S, h, d]`` goes
   straight to ``[b, h, d, S]`` by one ``Transpose(0,2,3,1)``), the topmost ``[b, S, h_kv, d]``
   value is used and ``key_layout`` / ``value_layout`` say ``"bshd"``.
5. The scale is the product of the constant scalars met on the score path and on the Q and K
   chains (``Div`` contributes its reciprocal); ``None`` when there are none.
6. An ONNX ``Attention`` node (opset 23+) is an *attention_op* site: inputs Q, K, V and
   ``attn_mask``; K/V are walked up as in rule 4 to undo an explicit GQA repetition; 3-D
   inputs use the ``q_num_heads``/``kv_num_heads`` attributes (layout ``"bsD"``). The scale
   is the ``scale`` attribute, else the op's default ``1/sqrt(head_dim)``.
7. Checks: Q rank 4 with ``n_heads`` at dim 1, K/V with the same ``n_kv_heads`` and head
   dim, ``n_heads % n_kv_heads == 0``. A candidate that fails is dropped (and explained by
   :func:`explain_no_match`), never raised.
8. The layer index comes from the dynamo ``pkg.torch.onnx.name_scopes`` metadata
   (``layers.3``, ``h.3``, ``blocks.3``) or legacy node names (``/m/model/layers.3/...``),
   else the order of appearance.
"""

from __future__ import annotations

__all__ = ["AttentionSite", "AttentionMatch", "Rejection", "match_attention", "find_attention_sites",
           "explain_no_match"]

import dataclasses
import functools
import logging
import math
import re

import numpy as np
import onnx
import onnx_ir as ir

from qeff.passes.ir.constants import const_array, const_scalar
from qeff.passes.ir.shape_inference import infer_shapes_weight_free
from qeff.passes.ir.traversal import ancestors
from qeff.passes.ir.symbolic_shapes import SymbolicShapes

logger = logging.getLogger(__name__)

# Ops that only move, repeat or reinterpret data: K/V keep their identity through them.
_LAYOUT_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Tile", "Cast", "Identity", "Flatten"}
# Ops allowed between the score MatMul and the Softmax.
_SCORE_PATH_OPS = {"Add", "Mul", "Div", "Where", "Cast", "Identity", "Sub"}
# Below this a constant is a mask sentinel, not a bias value.
_BIG_NEGATIVE = -1.0e4
_LAYER_RE = re.compile(r"(?:^|[./'])(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)(?=$|[./'])")
_WALK_LIMIT = 64
_ANCESTOR_LIMIT = 400  # values visited when deciding what an additive term derives from


@dataclasses.dataclass
class AttentionSite:
    """One attention site. Values and nodes belong to the model that was searched."""

    layer: int
    kind: str  # "decomposed" or "attention_op"
    query: ir.Value
    key: ir.Value
    value: ir.Value
    key_for_scores: ir.Value
    value_for_output: ir.Value
    score_matmul: ir.Node | None
    softmax: ir.Node | None
    output_matmul: ir.Node | None
    attention_node: ir.Node | None
    mask: ir.Value | None
    mask_node: ir.Node | None
    bias: list[ir.Value]
    scale: float | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    key_transposed_by: ir.Node | None
    # Layout of ``key`` / ``value``: "bhsd" ([b, h_kv, S, d], the usual case), "bshd"
    # ([b, S, h_kv, d], GPT-2's K) or "bsD" ([b, S, h_kv*d], 3-D Attention inputs).
    key_layout: str = "bhsd"
    value_layout: str = "bhsd"
    # Constant factor already applied to ``query`` (sdpa pre-scales q by sqrt(scale)); it is
    # part of ``scale``, so scores from ``query`` need ``scale / query_scale`` more.
    query_scale: float = 1.0
    # Attention logit soft-capping c · tanh(a · scores) after the scale (Gemma-2): (a, c).
    softcap: tuple[float, float] | None = None
    # Attention sinks (gpt-oss): one learned logit per head joined to each row of scores before
    # the Softmax and dropped after it.
    sinks: np.ndarray | None = None
    # The core runs with heads folded into the batch ([b*h, S, d] through bmm, BLOOM): its
    # output is [b*h, S, d] and ``query`` is the [b, h, S, d] value the folded one came from.
    heads_folded: bool = False


class _NoMatch(Exception):
    """Internal: a candidate was rejected; the message says why."""


class _Shapes:
    """Shape lookup by value name; fills in shapes missing from the model with ONNX shape
    inference on a weight-free copy (:mod:`qeff.passes.ir.shape_inference`), at most once."""

    def __init__(self, model: ir.Model):
        self._model = model
        self._inferred: dict[str, ir.Shape | None] | None = None

    def _needs_inference(self) -> bool:
        for node in self._model.graph:
            if node.op_type in ("MatMul", "Softmax", "Attention"):
                for v in (*node.inputs, *node.outputs):
                    if v is not None and (v.shape is None or any(
                            not isinstance(d, int) and _unknown(d.value) for d in v.shape)):
                        return True
        return False

    def _infer(self) -> dict[str, ir.Shape | None]:
        """Shapes by value name: ONNX inference on a weight-free copy, then, where it lost a
        dim (after ``Reshape(-1)``/``Expand`` in TorchScript graphs), the symbolic evaluation
        of the shape arithmetic that the ``fixed`` pass uses."""
        if self._inferred is None:
            self._inferred = {}
            if self._needs_inference():
                try:
                    copy = infer_shapes_weight_free(self._model)
                except onnx.shape_inference.InferenceError as err:
                    # The graph is inconsistent somewhere; what the model declares still counts.
                    logger.debug("shape inference failed: %s", err)
                    return self._inferred
                symbols = {d.value for x in copy.graph.inputs for d in (x.shape or ())
                           if not isinstance(d, int) and d.value and not _unknown(d.value)}
                symbolic = SymbolicShapes(copy, symbols).run()
                for node in copy.graph:
                    for v in node.outputs:
                        dims = symbolic.shapes.get(v)
                        shape = ir.Shape([symbolic.to_dim(d) for d in dims]) if dims is not None else v.shape
                        if v.name and shape is not None:
                            self._inferred[v.name] = shape
        return self._inferred

    def shape(self, v: ir.Value | None) -> tuple | None:
        if v is None:
            return None
        s = v.shape
        if s is None or any(not isinstance(d, int) and _unknown(d.value) for d in s):
            inferred = self._infer().get(v.name) if v.name else None
            if inferred is not None and (s is None or len(inferred) == len(s)):
                s = inferred
        if s is None:
            return None
        return tuple(d if isinstance(d, int) else (None if _unknown(d.value) else d.value) for d in s)


def _unknown(dim_name: str | None) -> bool:
    """An unnamed dim, or a placeholder ONNX shape inference invents (``unk__23``): it says
    nothing about which dims are equal, so it must not be matched as a name."""
    return dim_name is None or dim_name.startswith("unk__")


def _scalar_factor(node: ir.Node, data: ir.Value) -> tuple[ir.Value, float] | None:
    """For Mul/Div of ``data``'s path by a constant scalar: (other operand, factor)."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Mul":
        for x, c in ((a, b), (b, a)):
            f = const_scalar(c)
            if f is not None and const_scalar(x) is None:
                return x, f
        return None
    f = const_scalar(b)
    if f is not None and f != 0 and const_scalar(a) is None:
        return a, 1.0 / f
    return None


def _small_const(v: ir.Value | None) -> np.ndarray | None:
    """A small constant vector, also through an Unsqueeze/Reshape/Cast of one (as TorchScript
    writes Slice bounds before fold)."""
    array = const_array(v, max_elements=16)
    if array is not None or v is None or v.producer() is None:
        return array.reshape(-1) if array is not None else None
    p = v.producer()
    if p.op_type in ("Unsqueeze", "Reshape", "Cast", "Identity", "Squeeze") and p.inputs:
        inner = const_array(p.inputs[0], max_elements=16)
        return inner.reshape(-1) if inner is not None else None
    return None


def _drops_last_column(node: ir.Node) -> bool:
    """A Slice that keeps all but the last element of the last axis (``x[..., :-1]``)."""
    if node.op_type != "Slice" or len(node.inputs) < 4:
        return False
    starts, ends, axes = (_small_const(x) for x in node.inputs[1:4])
    steps = _small_const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    return (starts is not None and ends is not None and axes is not None and steps is not None
            and starts.tolist() == [0] and ends.tolist() == [-1] and axes.tolist() in ([-1], [3])
            and steps.tolist() == [1])


def _sink_logits(term: ir.Value, n_heads_hint: int | None = None) -> np.ndarray | None:
    """The per-head learned sink logits behind the column joined to the scores (gpt-oss): the
    one float parameter in the column's ancestry, of one value per head."""
    from qeff.passes.ir.traversal import ancestors

    found = []
    for x in ancestors(term, limit=40):
        array = const_array(x, max_elements=4096)
        if array is not None and array.size > 1 and np.issubdtype(array.dtype, np.floating):
            found.append(array.reshape(-1))  # [h], or already [1, h, 1, 1] in a folded graph
    if len(found) != 1 or (n_heads_hint is not None and found[0].size != n_heads_hint):
        return None
    return found[0]


def _softcap(node: ir.Node) -> tuple[ir.Value, float, float] | None:
    """``c · tanh(a · s)`` (attention logit soft-capping, Gemma-2) ending at ``node``:
    (s, a, c); None for anything else."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    for t, c in (node.inputs, reversed(node.inputs)):
        cap = const_scalar(c)
        tanh = t.producer() if t is not None else None
        if cap is None or tanh is None or tanh.op_type != "Tanh":
            continue
        inner = tanh.inputs[0]
        factor = _scalar_factor(inner.producer(), inner) if inner.producer() is not None else None
        return (factor[0], factor[1], cap) if factor is not None else (inner, 1.0, cap)
    return None


def _reaches_matmul(v: ir.Value | None, depth: int = 8) -> bool:
    """Whether a MatMul is reachable upwards through score-path ops (Add/Mul/Div/Where/Cast)."""
    if v is None or depth < 0:
        return False
    p = v.producer()
    if p is None:
        return False
    if p.op_type == "MatMul":
        return True
    if p.op_type in _SCORE_PATH_OPS or p.op_type == "Tanh":  # Tanh: a soft-cap on the scores
        return any(_reaches_matmul(x, depth - 1) for x in p.inputs)
    if p.op_type == "Reshape":  # folded heads unfolded (BLOOM); the shape input never leads there
        return _reaches_matmul(p.inputs[0], depth - 1)
    return False


def _is_mask_term(term: ir.Value, graph: ir.Graph) -> tuple[bool, bool]:
    """(holds a big negative constant, depends on an attention-mask input through data)."""
    big_neg = False
    from_mask = False
    mask_inputs = {id(i) for i in graph.inputs if i.name and "mask" in i.name}
    for x in ancestors(term, limit=_ANCESTOR_LIMIT):
        if id(x) in mask_inputs:
            from_mask = True
        arr = const_array(x, max_elements=16)
        if arr is not None and np.issubdtype(arr.dtype, np.floating):
            if np.any(arr <= _BIG_NEGATIVE):
                big_neg = True
        if big_neg and from_mask:
            break
    return big_neg, from_mask


def _layer_of(node: ir.Node) -> int | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    for text in (scopes, node.name):
        if text:
            found = _LAYER_RE.findall(text)
            if found:
                return int(found[-1])
    return None


def _sym_eq(a, b) -> bool:
    """Dims equal, treating unknown (None) as compatible; named dims also when their
    expressions are (dynamo names a dim ``((seq**2)//seq)``)."""
    return a is None or b is None or a == b or (isinstance(a, str) and isinstance(b, str) and _same_expression(a, b))


@functools.lru_cache(maxsize=256)
def _same_expression(a: str, b: str) -> bool:
    """Two dim names that are the same expression of positive integer symbols."""
    import sympy

    try:
        names = {n for n in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", a + " " + b)}
        symbols = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
        return sympy.simplify(sympy.sympify(a, locals=symbols) - sympy.sympify(b, locals=symbols)) == 0
    except (sympy.SympifyError, TypeError, SyntaxError):
        return False


class _Matcher:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.shapes = _Shapes(model)

    # -- helpers ---------------------------------------------------------------------------
    def _rank(self, v: ir.Value | None) -> int | None:
        s = self.shapes.shape(v)
        return None if s is None else len(s)

    def _walk_layout(self, v: ir.Value) -> tuple[list[ir.Value], list[ir.Node], float]:
        """Chain of values from ``v`` upwards through layout ops and constant-scalar Mul/Div.

        Returns (values, nodes, factor): values[0] is ``v``; nodes[i] produces values[i].
        """
        values = [v]
        nodes: list[ir.Node] = []
        factor = 1.0
        for _ in range(_WALK_LIMIT):
            p = values[-1].producer()
            if p is None or not p.inputs or p.inputs[0] is None:
                break
            if p.op_type in _LAYOUT_OPS:
                values.append(p.inputs[0])
            else:
                sf = _scalar_factor(p, values[-1])
                if sf is None:
                    break
                values.append(sf[0])
                factor *= sf[1]
            nodes.append(p)
        return values, nodes, factor

    def _pick(self, chain: list[ir.Value], n_heads: int, head_dim: int, seq) -> tuple[ir.Value, str, int]:
        """Topmost [b,h,S,d] value of a chain, else topmost [b,S,h,d]."""
        bhsd = bshd = None
        for v in chain:
            s = self.shapes.shape(v)
            if s is None or len(s) != 4 or s[3] != head_dim:
                continue
            if isinstance(s[1], int) and s[1] > 0 and n_heads % s[1] == 0 and _sym_eq(s[2], seq) \
                    and (seq is not None or not isinstance(s[2], int)):
                bhsd = (v, "bhsd", s[1])
            if isinstance(s[2], int) and s[2] > 0 and n_heads % s[2] == 0 and _sym_eq(s[1], seq) \
                    and (seq is not None or not isinstance(s[1], int)):
                bshd = (v, "bshd", s[2])
        if bhsd is not None:
            return bhsd
        if bshd is not None:
            return bshd
        raise _NoMatch("no [b, h, S, d] or [b, S, h, d] value on the K/V chain")

    # -- decomposed ------------------------------------------------------------------------
    def match_softmax(self, softmax: ir.Node) -> AttentionSite:
        x = softmax.inputs[0]
        rank = self._rank(x)
        axis_attr = softmax.attributes.get("axis")
        axis = axis_attr.value if axis_attr is not None else -1
        if rank is not None and axis < 0:
            axis += rank
        if rank is not None and axis != rank - 1:
            raise _NoMatch(f"Softmax axis {axis} is not the last axis")
        if axis >= 0 and rank is None and axis != 3:
            raise _NoMatch("Softmax of unknown rank over a non-last axis")

        # Forward: softmax -> [Cast | Identity | Dropout | NaN-guard Where | x[..., :-1]] -> MatMul (A input).
        out = softmax.outputs[0]
        output_matmul = None
        sink_slice = None
        fold_out = fold_in = None
        for _ in range(5):
            nxt = None
            for use in out.uses():
                node, idx = use.node, use.idx
                if node.op_type == "MatMul" and idx == 0:
                    output_matmul = node
                    break
                if node.op_type in ("Cast", "Identity", "Dropout") and idx == 0:
                    nxt = node.outputs[0]
                elif node.op_type == "Reshape" and idx == 0 and fold_out is None:
                    nxt, fold_out = node.outputs[0], node  # [b, h, S, T] -> [b*h, S, T] (BLOOM's bmm)
                elif idx == 0 and _drops_last_column(node):  # the sink column leaves (gpt-oss)
                    nxt, sink_slice = node.outputs[0], node
                elif node.op_type == "Where" and idx in (1, 2):
                    cond = node.inputs[0].producer() if node.inputs[0] is not None else None
                    if cond is not None and cond.op_type == "IsNaN":
                        nxt = node.outputs[0]
            if output_matmul is not None or nxt is None:
                break
            out = nxt
        if output_matmul is None:
            raise _NoMatch("Softmax output does not feed the A input of a MatMul")

        # Backward: softmax input -> ... -> score MatMul.
        scale = 1.0
        have_scale = False
        mask = mask_node = None
        bias: list[ir.Value] = []
        v = x
        score_matmul = None
        softcap = None
        sinks = None
        if sink_slice is not None:
            p = v.producer()
            if p is not None and p.op_type == "Sub" and len(p.inputs) == 2 and p.inputs[1] is not None \
                    and p.inputs[1].producer() is not None and p.inputs[1].producer().op_type == "ReduceMax":
                v = p.inputs[0]  # x - max(x): softmax is unchanged by it
            p = v.producer()
            axis = p.attributes.get("axis") if p is not None else None
            if p is None or p.op_type != "Concat" or len(p.inputs) != 2 or axis is None or axis.value not in (-1, 3):
                raise _NoMatch(f"Softmax output is cut by {sink_slice.name!r} but its input is not scores "
                               "joined to a sink column")
            sinks = _sink_logits(p.inputs[1])
            if sinks is None:
                raise _NoMatch(f"the column joined to the scores in {p.name!r} is not one learned logit per head")
            v = p.inputs[0]
        for _ in range(_WALK_LIMIT):
            p = v.producer()
            if p is None:
                break
            op = p.op_type
            if op == "MatMul":
                score_matmul = p
                break
            if op in ("Cast", "Identity"):
                v = p.inputs[0]
                continue
            if op == "Reshape" and fold_in is None and fold_out is not None:
                fold_in, v = p, p.inputs[0]  # [b*h, S, T] -> [b, h, S, T]
                continue
            cap = _softcap(p)
            if cap is not None:
                # The rewrite applies scale, then the cap, then bias and mask: anything the walk
                # met above the cap is outside it, and only bias and mask may be.
                if softcap is not None or have_scale:
                    raise _NoMatch(f"a scale or a second soft-cap outside the soft-cap {p.name!r}")
                v, softcap = cap[0], (cap[1], cap[2])
                continue
            if softcap is not None and op in ("Add", "Sub", "Where"):
                raise _NoMatch(f"{op} {p.name!r} inside the soft-cap: only a scale may be")
            sf = _scalar_factor(p, v)
            if sf is not None:
                scale *= sf[1]
                have_scale = True
                v = sf[0]
                continue
            if op in ("Add", "Sub") and len(p.inputs) == 2:
                a, b = p.inputs
                ra, rb = _reaches_matmul(a), _reaches_matmul(b)
                if ra == rb:
                    raise _NoMatch(f"cannot tell the scores from the term in {op} {p.name!r}")
                scores, term = (a, b) if ra else (b, a)
                if op == "Sub" and scores is b:
                    raise _NoMatch(f"scores are subtracted in {p.name!r}")
                big_neg, _ = _is_mask_term(term, self.graph)
                if big_neg and mask is None:
                    mask, mask_node = term, p
                else:
                    bias.append(term)
                v = scores
                continue
            if op == "Where" and len(p.inputs) == 3:
                cond, a, b = p.inputs
                ra, rb = _reaches_matmul(a), _reaches_matmul(b)
                if ra == rb:
                    raise _NoMatch(f"cannot tell the scores in Where {p.name!r}")
                if mask is None:
                    mask, mask_node = cond, p
                v = a if ra else b
                continue
            raise _NoMatch(f"Softmax input leads to {op} {p.name!r}, not to a score MatMul")
        if score_matmul is None:
            raise _NoMatch("Softmax input is not (a scaled / masked) MatMul")
        folded = fold_out is not None
        if folded and fold_in is None:
            raise _NoMatch(f"the Softmax output is reshaped by {fold_out.name!r} but its input was not")
        rank = 3 if folded else 4
        if self._rank(score_matmul.outputs[0]) not in (rank, None):
            raise _NoMatch(f"Softmax found but its input is not a MatMul of rank {rank}")
        if self._rank(output_matmul.outputs[0]) not in (rank, None):
            raise _NoMatch(f"the output MatMul is not of rank {rank}")

        # No term with a sentinel constant: fall back to the one fed by attention_mask data.
        if mask is None:
            for i, term in enumerate(bias):
                if _is_mask_term(term, self.graph)[1]:
                    mask = bias.pop(i)
                    mask_node = next((u.node for u in term.uses() if u.node.op_type in ("Add", "Sub")), None)
                    break

        query = score_matmul.inputs[0]
        key_for_scores = score_matmul.inputs[1]
        value_for_output = output_matmul.inputs[1]
        if folded:
            query = self._unfolded_query(query, softmax.inputs[0], (fold_in, fold_out))
        qs = self.shapes.shape(query)
        if qs is None or len(qs) != 4 or not isinstance(qs[1], int) or not isinstance(qs[3], int):
            raise _NoMatch(f"query of the score MatMul has shape {qs}, not [b, n_heads, S, d]")
        n_heads, head_dim = qs[1], qs[3]
        ss = self.shapes.shape(score_matmul.outputs[0])
        seq = ss[-1] if ss is not None and len(ss) in (3, 4) else None  # the scores' key length

        _, _, qf = self._walk_layout(query)
        kchain, knodes, kf = self._walk_layout(key_for_scores)
        vchain, _, _ = self._walk_layout(value_for_output)
        key, key_layout, value, value_layout, n_kv = self._pick_key_value(
            kchain, vchain, n_heads, head_dim, seq
        )
        k_idx = kchain.index(key)
        if qf != 1.0 or kf != 1.0:
            # Pre-scaled q/k (sdpa splits sqrt(scale) over both). Only the factors below the
            # chosen K count; a factor above it would be part of K's own computation.
            kf = 1.0
            for node, below in zip(knodes[:k_idx], kchain[:k_idx]):
                sf = _scalar_factor(node, below)
                if sf is not None:
                    kf *= sf[1]
            scale *= qf * kf
            have_scale = True
        transposed_by = None
        for node in reversed(knodes[:k_idx]):
            if node.op_type == "Transpose":
                transposed_by = node
                break
        if sinks is not None and sinks.size != n_heads:
            raise _NoMatch(f"{sinks.size} sink logits for {n_heads} heads")
        return AttentionSite(
            layer=-1, kind="decomposed", query=query, key=key, value=value,
            key_for_scores=key_for_scores, value_for_output=value_for_output,
            score_matmul=score_matmul, softmax=softmax, output_matmul=output_matmul,
            attention_node=None, mask=mask, mask_node=mask_node, bias=bias,
            scale=scale if have_scale else None, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, key_transposed_by=transposed_by,
            key_layout=key_layout, value_layout=value_layout, query_scale=qf, softcap=softcap, sinks=sinks,
            heads_folded=folded,
        )

    def _unfolded_query(self, query: ir.Value, scores: ir.Value, folds: tuple[ir.Node, ir.Node]) -> ir.Value:
        """For a core whose heads are folded into the batch (``[b*h, S, d]`` through
        ``bmm``, BLOOM): the ``[b, h, S, d]`` query it was reshaped from. Each reshape between
        the 3-D and 4-D forms must keep the last two dims, so it only merges or splits b and h."""
        ss = self.shapes.shape(scores)
        if ss is None or len(ss) != 4 or not isinstance(ss[1], int):
            raise _NoMatch(f"folded-head scores {ss} do not show the head count at dim 1")
        n_heads = ss[1]
        for node in folds:
            a, b = (self.shapes.shape(x) for x in (node.inputs[0], node.outputs[0]))
            if a is None or b is None or sorted((len(a), len(b))) != [3, 4] \
                    or not (_sym_eq(a[-1], b[-1]) and _sym_eq(a[-2], b[-2])):
                raise _NoMatch(f"Reshape {node.name!r} ({a} -> {b}) does not only fold heads into the batch")
        v = query
        for _ in range(_WALK_LIMIT):
            s = self.shapes.shape(v)
            if s is not None and len(s) == 4:
                qs3 = self.shapes.shape(query)
                if s[1] != n_heads or qs3 is None or not (_sym_eq(s[2], qs3[1]) and _sym_eq(s[3], qs3[2])):
                    raise _NoMatch(f"the folded query {qs3} does not come from a [b, {n_heads}, S, d] value ({s})")
                return v
            p = v.producer()
            if p is None or p.op_type not in ("Reshape", "Cast", "Identity"):
                break
            v = p.inputs[0]
        raise _NoMatch("the folded query is not reshaped from a [b, h, S, d] value")

    def _pick_key_value(self, kchain, vchain, n_heads: int, head_dim: int, seq):
        """Pre-repetition K and V from their layout chains; both must agree on the head count."""
        key, key_layout, n_kv = self._pick(kchain, n_heads, head_dim, seq)
        value, value_layout, n_kv_v = self._pick(vchain, n_heads, head_dim, seq)
        if n_kv != n_kv_v:
            raise _NoMatch(f"K has {n_kv} heads but V has {n_kv_v}")
        return key, key_layout, value, value_layout, n_kv

    # -- ONNX Attention --------------------------------------------------------------------
    def match_attention(self, node: ir.Node) -> AttentionSite:
        ins = list(node.inputs) + [None] * (4 - len(node.inputs))
        q, k, v, mask = ins[:4]
        if q is None or k is None or v is None:
            raise _NoMatch("Attention node without q/k/v inputs")
        qs = self.shapes.shape(q)
        if qs is None:
            raise _NoMatch("Attention query has no known shape")
        scale_attr = node.attributes.get("scale")
        if len(qs) == 4:
            n_heads, head_dim = qs[1], qs[3]
            if not isinstance(n_heads, int) or not isinstance(head_dim, int):
                raise _NoMatch(f"Attention query shape {qs} has no static heads / head_dim")
            seq = None
            ks = self.shapes.shape(k)
            if ks is not None and len(ks) == 4:
                seq = ks[2]
            kchain, knodes, _ = self._walk_layout(k)
            vchain, _, _ = self._walk_layout(v)
            key, key_layout, value, value_layout, n_kv = self._pick_key_value(
                kchain, vchain, n_heads, head_dim, seq
            )
        elif len(qs) == 3:
            qh = node.attributes.get("q_num_heads")
            kh = node.attributes.get("kv_num_heads")
            if qh is None or kh is None or not isinstance(qs[2], int):
                raise _NoMatch("3-D Attention without q_num_heads / kv_num_heads")
            n_heads, n_kv = qh.value, kh.value
            head_dim = qs[2] // n_heads
            key, value, key_layout, value_layout = k, v, "bsD", "bsD"
        else:
            raise _NoMatch(f"Attention query of rank {len(qs)}")
        if n_kv <= 0 or n_heads % n_kv:
            raise _NoMatch(f"{n_heads} heads is not a multiple of {n_kv} KV heads")
        scale = float(scale_attr.value) if scale_attr is not None else 1.0 / math.sqrt(head_dim)
        return AttentionSite(
            layer=-1, kind="attention_op", query=q, key=key, value=value,
            key_for_scores=k, value_for_output=v, score_matmul=None, softmax=None,
            output_matmul=None, attention_node=node, mask=mask,
            mask_node=node if mask is not None else None, bias=[], scale=scale,
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, key_transposed_by=None,
            key_layout=key_layout, value_layout=value_layout,
        )

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> AttentionMatch:
        sites: list[tuple[int, ir.Node, AttentionSite]] = []
        rejected: list[Rejection] = []
        for order, node in enumerate(self.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Softmax", "Attention"):
                continue
            try:
                site = self.match_softmax(node) if node.op_type == "Softmax" else self.match_attention(node)
            except _NoMatch as err:  # a candidate that is not attention, or not attention we know
                rejected.append(Rejection(_layer_of(node), node, str(err)))
                logger.debug("not an attention site: %s", rejected[-1])
                continue
            sites.append((order, node, site))
        layers = [_layer_of(n) for _, n, _ in sites]
        use_scopes = all(x is not None for x in layers) and len(set(layers)) == len(layers)
        for i, (_, _, site) in enumerate(sites):
            site.layer = layers[i] if use_scopes else i
        found = sorted((site for _, _, site in sites), key=lambda s: s.layer)
        return AttentionMatch(found, rejected, any(n.op_type in ("Softmax", "Attention") for n in self.graph))


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A Softmax or Attention node not taken as an attention site, and why."""

    layer: int | None  # from the name scopes or the node name, when they say
    node: ir.Node
    reason: str

    def __str__(self) -> str:
        return f"{self.node.op_type} {self.node.name!r}: {self.reason}"


@dataclasses.dataclass
class AttentionMatch:
    """What one run of the matcher found: the sites in layer order and every rejection."""

    sites: list[AttentionSite]
    rejected: list[Rejection]
    had_candidates: bool

    def explain(self) -> str:
        """One line saying what was looked for and what was found instead."""
        if not self.had_candidates:
            return ("no Softmax node in the graph (looked for MatMul → [scale] → [mask] → Softmax → MatMul "
                    "or an ONNX Attention node)")
        if not self.rejected:
            return f"{len(self.sites)} attention site(s) matched; nothing was rejected"
        return f"{len(self.sites)} site(s) matched, {len(self.rejected)} rejected; first: {self.rejected[0]}"


def match_attention(model: ir.Model) -> AttentionMatch:
    """Run the matcher once over ``model`` (never modified): sites and rejections."""
    return _Matcher(model).run()


def find_attention_sites(model: ir.Model) -> list[AttentionSite]:
    """Attention sites of ``model`` in layer order; [] when none match."""
    return match_attention(model).sites


def explain_no_match(model: ir.Model) -> str:
    """One line saying what was looked for and what was found instead."""
    return match_attention(model).explain()
