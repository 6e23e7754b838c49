"""Graph pieces the ``kv`` pass inserts: cache write, cache read, attention core, last-token gather.

Everything here is built from standard ONNX ops (opset 17+) so the result runs in onnxruntime
as is. Shared tensors (slot indices, visibility mask, pad flags) are built once per model and
reused by every layer; only the cache input/output of a layer is per layer.

Design points (why the graph looks the way it does):
- The cache is ``[batch, n_kv, ctx_len, head_dim]`` with ``ctx_len`` read from the cache
  input's shape, so one graph serves every context length the compiler specializes.
- A valid token writes its K/V to slot ``position_id``. A pad (``position_id < 0``) writes,
  to the slot of its row's last valid token (the highest position, the token ``last_index``
  picks), exactly the K/V that token writes there; a row with no valid token writes the old
  value of slot 0 back to slot 0. ScatterND leaves the order of writes to one slot undefined,
  and these duplicates are identical, so the result is the same in any order, even when the
  valid tokens of one call fill every slot (a pad aimed at any other slot would then collide
  with a different valid write). Every index stays in range (onnxruntime rejects
  out-of-range ones) and the per-layer cost is two gathers of ``[b, n_kv, 1, d]``.
- Slot ``c`` is visible to a query at position ``p`` iff ``c <= p`` (and ``c > p - window``
  with a sliding window, ``c // chunk == p // chunk`` with chunked attention). Masking is a select (``Where``), not an addition, so a row with
  nothing visible gets a uniform softmax instead of NaN.
"""

from __future__ import annotations

__all__ = ["KVGraphBuilder"]

import numpy as np
import onnx_ir as ir

from qeff.passes.ir.builder import GraphBuilder

_INT64 = ir.DataType.INT64


class KVGraphBuilder(GraphBuilder):
    """The kv pass's ops, emitted into a tape; the caller appends ``tape.nodes`` to the graph."""

    def __init__(self, graph: ir.Graph, opset: int, prefix: str = "qeff_kv"):
        super().__init__(graph, opset, prefix)

    # -- shared tensors --------------------------------------------------------------------
    def shared(self, input_ids: ir.Value, position_ids: ir.Value, first_cache: ir.Value,
               batch_index: ir.Value | None) -> None:
        """Build the tensors every layer shares (call once, before any layer)."""
        pos = position_ids
        self.batch = self.op("Shape", [input_ids], {"start": 0, "end": 1}, "batch")  # [1]
        self.seq = self.op("Shape", [input_ids], {"start": 1, "end": 2}, "seq")  # [1]
        ctx = self.op("Shape", [first_cache], {"start": 2, "end": 3}, "ctx_len")  # [1]
        ctx_scalar = self.op("Squeeze", [ctx, self.i64(0)])
        slots = self.op("Range", [self.const(np.int64(0)), ctx_scalar, self.const(np.int64(1))], what="slots")
        self.slots = slots  # [ctx]

        # Visibility [b, 1, S, ctx]: slot c is visible to a query at position p iff c <= p.
        p4 = self.unsqueeze(pos, 1, 3)  # [b, 1, S, 1]
        c4 = self.op("Reshape", [slots, self.i64(1, 1, 1, -1)])  # [1, 1, 1, ctx]
        self.visible = self.op("LessOrEqual", [c4, p4], what="visible")
        self._p4, self._c4 = p4, c4
        self._windows: dict[tuple[str, int], ir.Value] = {}

        # Scatter slots [b, S]: valid tokens at their position, pads at their row's last valid
        # position, or at slot 0 when the row has none (the max position is then negative).
        zero = self.const(np.int64(0))
        is_pad = self.op("Less", [pos, zero], what="is_pad")
        last = self.reduce_max(pos, 1)  # [b, 1]
        pad_slot = self.op("Max", [last, zero], what="pad_slot")
        self.slot = self.op("Where", [is_pad, pad_slot, pos], what="slot")
        self.is_pad4 = self.unsqueeze(is_pad, 1, 3)  # [b, 1, S, 1]
        self.has_valid4 = self.unsqueeze(self.op("GreaterOrEqual", [last, zero], what="has_valid"), 2, 3)  # [b,1,1,1]
        self.continuous = batch_index is not None

        # Cache row of each batch entry [b, 1]: batch_index, else 0..b-1. An unused entry
        # (batch_index -1, as a serving loop sends for idle rows) reads row 0 and writes exactly
        # what a used entry (the one with the highest row) writes: a -1 index would address the
        # last row, and identical duplicate writes leave the cache as the used entry leaves it.
        if batch_index is not None:
            self.rows = self.op("Max", [batch_index, self.const(np.int64(0))], what="rows_in_range")
            self.rows_flat = self.op("Squeeze", [self.rows, self.i64(1)], what="rows")
            unused = self.op("Less", [batch_index, self.const(np.int64(0))], what="unused_row")
            self.unused4 = self.unsqueeze(unused, 2, 3)  # [b, 1, 1, 1]
            self.donor = self.op("Reshape", [self.op("ArgMax", [batch_index], {"axis": 0, "keepdims": 1}), self.i64(1)],
                                 what="donor_row")  # [1]
        else:
            b_scalar = self.op("Squeeze", [self.batch, self.i64(0)])
            self.rows_flat = self.op("Range", [self.const(np.int64(0)), b_scalar, self.const(np.int64(1))], what="rows")
            self.rows = self.unsqueeze(self.rows_flat, 1)
        self._indices: dict[int, ir.Value] = {}

        # Index of each row's last valid token [b, 1, 1] for GatherND(batch_dims=1). ArgMax
        # takes the first maximum, the same token whose K/V the row's pads copy.
        last_token = self.op("ArgMax", [pos], {"axis": 1, "keepdims": 1}, "last_token")  # [b, 1]
        self.last_index = self.unsqueeze(last_token, 2)
        self._last_index4 = self.unsqueeze(last_token, 2, 3)  # [b, 1, 1, 1]
        self._last_new_indices: dict[int, ir.Value] = {}

    def indices(self, n_kv: int) -> ir.Value:
        """ScatterND/GatherND indices [b, n_kv, S, 3] = (cache row, head, slot)."""
        if n_kv not in self._indices:
            target = self.op("Concat", [self.batch, self.i64(n_kv), self.seq], {"axis": 0})
            rows = self.op("Expand", [self.unsqueeze(self.rows, 2), target])  # [b,1,1] -> [b,h,S]
            heads = self.op("Expand", [self.const(np.arange(n_kv, dtype=np.int64).reshape(1, n_kv, 1)), target])
            slots = self.op("Expand", [self.unsqueeze(self.slot, 1), target])  # [b,1,S] -> [b,h,S]
            parts = [self.unsqueeze(x, 3) for x in (rows, heads, slots)]
            self._indices[n_kv] = self._from_donor(self.op("Concat", parts, {"axis": 3}, f"indices_h{n_kv}"))
        return self._indices[n_kv]

    def _from_donor(self, x: ir.Value) -> ir.Value:
        """Continuous batching: unused entries take the donor entry's ``x`` [b, ...]."""
        if not self.continuous:
            return x
        return self.op("Where", [self.unused4, self.op("Gather", [x, self.donor], {"axis": 0}), x], what="from_donor")

    def last_new_indices(self, n_kv: int) -> ir.Value:
        """GatherND(batch_dims=2) indices [b, n_kv, 1, 1]: each row's last valid token."""
        if n_kv not in self._last_new_indices:
            self._last_new_indices[n_kv] = self.op("Expand", [self._last_index4, self.i64(1, n_kv, 1, 1)],
                                                   what=f"last_token_h{n_kv}")
        return self._last_new_indices[n_kv]

    # -- per layer -------------------------------------------------------------------------
    def to_bhsd(self, x: ir.Value, layout: str, n_kv: int, head_dim: int) -> ir.Value:
        if layout == "bhsd":
            return x
        if layout == "bsD":
            x = self.op("Reshape", [x, self.i64(0, 0, n_kv, head_dim)])
        return self.op("Transpose", [x], {"perm": [0, 2, 1, 3]})

    def write_cache(self, past: ir.Value, new: ir.Value, n_kv: int, retained_name: str) -> ir.Value:
        """ScatterND of ``new`` [b, n_kv, S, d] into ``past``; a pad repeats its row's last
        valid write, or writes slot 0's old value back when the row has no valid token."""
        idx = self.indices(n_kv)
        if new.dtype is not None and past.dtype is not None and new.dtype != past.dtype:
            new = self.op("Cast", [new], {"to": past.dtype})
        last_new = self.op("GatherND", [new, self.last_new_indices(n_kv)], {"batch_dims": 2}, "last_new")  # [b,h,1,d]
        old0 = self.op("Slice", [past, self.i64(0), self.i64(1), self.i64(2)], what="old_slot0")  # [rows,h,1,d]
        if self.continuous:
            old0 = self.op("Gather", [old0, self.rows_flat], {"axis": 0}, "old_slot0_rows")  # [b,h,1,d]
        pad_value = self.op("Where", [self.has_valid4, last_new, old0], what="pad_value")
        update = self._from_donor(self.op("Where", [self.is_pad4, pad_value, new], what="update"))
        retained = self.tape.op("ScatterND", [past, idx, update], name=self._name("cache_write"))
        retained.name = retained_name
        retained.dtype = past.dtype
        retained.shape = past.shape
        return retained

    def read_cache(self, retained: ir.Value, compute_dtype: ir.DataType | None, continuous: bool) -> ir.Value:
        x = retained
        if continuous:
            x = self.op("Gather", [x, self.rows_flat], {"axis": 0}, "cache_rows")
        if compute_dtype is not None and retained.dtype != compute_dtype:
            x = self.op("Cast", [x], {"to": compute_dtype})
        return x

    def repeat_heads(self, x: ir.Value, n_kv: int, n_heads: int, head_dim: int) -> ir.Value:
        """[b, n_kv, ctx, d] -> [b, n_heads, ctx, d], each KV head repeated n_heads/n_kv times
        consecutively (the GQA convention of every Hugging Face decoder)."""
        if n_kv == n_heads:
            return x
        rep = n_heads // n_kv
        x = self.unsqueeze(x, 2)  # [b, n_kv, 1, ctx, d]
        x = self.op("Expand", [x, self.i64(1, 1, rep, 1, 1)])
        return self.op("Reshape", [x, self.i64(0, n_heads, -1, head_dim)], what="repeat_kv")

    def alibi(self, slopes: np.ndarray, dtype: np.dtype) -> ir.Value:
        """ALiBi bias [1, h, 1, ctx] = slope_h * slot (softmax ignores a per-row constant)."""
        c = self.op("Cast", [self.slots], {"to": ir.DataType.from_numpy(np.dtype(dtype))})
        c = self.op("Reshape", [c, self.i64(1, 1, 1, -1)])
        return self.op("Mul", [c, self.const(slopes.reshape(1, -1, 1, 1).astype(dtype))], what="alibi")

    def visibility(self, window: int | None, chunk: int | None = None) -> ir.Value:
        """[b, 1, S, ctx]: causal, with a sliding window also ``c > p - window``, with chunked
        attention also ``c // chunk == p // chunk`` (each built once and shared by the layers
        that use it). A pad's position is negative: it sees nothing either way."""
        if window is None and chunk is None:
            return self.visible
        key = ("window", window) if window is not None else ("chunk", chunk)
        if key not in self._windows:
            if window is not None:
                lowest = self.op("Sub", [self._p4, self.const(np.int64(window))])
                rule = self.op("Greater", [self._c4, lowest])
            else:
                size = self.const(np.int64(chunk))
                rule = self.op("Equal", [self.op("Div", [self._c4, size]), self.op("Div", [self._p4, size])])
            self._windows[key] = self.op("And", [self.visible, rule], what=f"visible_{key[0]}{key[1]}")
        return self._windows[key]

    def attention(self, query: ir.Value, key: ir.Value, value: ir.Value, scale: float,
                  biases: list[ir.Value], dtype: np.dtype, visible: ir.Value | None = None,
                  softcap: tuple[float, float] | None = None, sinks: np.ndarray | None = None) -> ir.Value:
        """softmax(where(visible, cap(q·kᵀ·scale) + bias, min)) · v over the whole cache, where
        cap(s) = c · tanh(a · s) with a soft-cap (a, c), else s."""
        kt = self.op("Transpose", [key], {"perm": [0, 1, 3, 2]})
        scores = self.op("MatMul", [query, kt], what="scores")
        if scale != 1.0:
            scores = self.op("Mul", [scores, self.const(np.array(scale, dtype=dtype))])
        if softcap is not None:
            inner, cap = softcap
            if inner != 1.0:
                scores = self.op("Mul", [scores, self.const(np.array(inner, dtype=dtype))])
            scores = self.op("Mul", [self.op("Tanh", [scores]), self.const(np.array(cap, dtype=dtype))],
                             what="softcapped")
        for b in biases:
            scores = self.op("Add", [scores, b])
        fill = self.const(np.array(np.finfo(dtype).min, dtype=dtype))
        scores = self.op("Where", [visible if visible is not None else self.visible, scores, fill],
                         what="masked_scores")
        if sinks is not None:
            # Each head's sink logit joins every row: it takes its share of the softmax and is
            # dropped after it, so the rows of visible slots no longer sum to one.
            column = self.op("Expand", [self.const(sinks.reshape(1, -1, 1, 1).astype(dtype)),
                                        self.op("Concat", [self.op("Shape", [scores], {"end": 3}), self.i64(1)],
                                                {"axis": 0})], what="sink_column")
            scores = self.op("Concat", [scores, column], {"axis": -1}, "with_sinks")
            probs = self.op("Softmax", [scores], {"axis": -1}, "probs")
            probs = self.op("Slice", [probs, self.i64(0), self.i64(-1), self.i64(-1)], what="without_sinks")
            return self.op("MatMul", [probs, value], what="attn_out")
        probs = self.op("Softmax", [scores], {"axis": -1}, "probs")
        return self.op("MatMul", [probs, value], what="attn_out")

    def last_token(self, x: ir.Value) -> ir.Value:
        """x [b, S, ...] -> [b, 1, ...] at each row's last valid position."""
        return self.op("GatherND", [x, self.last_index], {"batch_dims": 1}, "last_token_state")
