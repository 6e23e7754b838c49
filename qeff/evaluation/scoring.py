"""Logits for the scored positions of a batch of windows, from a plain export or a KV model.

- A plain export (no cache) sees each window at once: one call per batch of windows, with
  ``attention_mask`` and ``position_ids`` as the exporter declared them.
- A KV model is driven as it is deployed (DESIGN §5): the window's context is prefilled in chunks
  of the model's prefill length (right-padded, pads at position -1), then every further token is
  one decode step with the cache kept in the :class:`~qeff.runtime.OrtSession`. Its logits are
  the last valid token's, so the scored positions are exactly the prefill's last one and the
  decode steps'. A model with continuous batching is prefilled row by row (``batch_index``).

Both give, per window, the logits at offsets ``context - 1 … window - 2``: the predictions of the
tokens at ``context … window - 1``.
"""

from __future__ import annotations

__all__ = ["Scorer", "PlainScorer", "KVScorer", "open_scorer"]

import abc
import math
import os

import numpy as np

from qeff.contract import ATTENTION_MASK, BATCH_INDEX, INPUT_IDS, LOGITS, POSITION_IDS, is_cache_input
from qeff.errors import QeffError

DEFAULT_BATCH = 8


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class Scorer(abc.ABC):
    """``rows``: windows per call (a model bound to one batch size takes exactly that many);
    ``max_window``: the longest window the model can see (None: no bound)."""

    kind: str
    rows: int = DEFAULT_BATCH
    fixed_rows: bool = False
    max_window: int | None = None
    vocab: int | None = None

    @abc.abstractmethod
    def logits(self, windows: np.ndarray, context: int) -> np.ndarray:
        """``[rows, window - context, vocab]`` float32 for a ``[rows, window]`` batch."""

    def score(self, windows: np.ndarray, context: int) -> np.ndarray:
        """Pads a short batch for a model bound to one batch size and drops the pads' rows."""
        n = len(windows)
        if self.fixed_rows and n < self.rows:
            windows = np.concatenate([windows, np.repeat(windows[-1:], self.rows - n, axis=0)])
        return self.logits(windows, context)[:n]

    def close(self) -> None:  # noqa: B027 - most scorers hold nothing to release
        pass


class PlainScorer(Scorer):
    kind = "plain"

    def __init__(self, model: str | os.PathLike | bytes, label: str) -> None:
        from qeff.common.onnxrt import onnxruntime_session

        # Weights used in place, as OrtSession does: packing copies every MatMul weight into
        # anonymous memory (a 1B evaluation peaked at 5.4 GB instead of 0.5 GB) to speed up whole windows.
        self.session = onnxruntime_session(model if isinstance(model, bytes) else os.fspath(model),
                                           purpose=f" for {label}", prepack=False)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_IDS not in inputs:
            raise QeffError(f"{label} has no {INPUT_IDS} input, so it is not a language model",
                            "evaluate a causal LM export")
        outputs = [o.name for o in self.session.get_outputs()]
        if LOGITS not in outputs:  # e.g. an encoder's hidden states: not next-token scores
            raise QeffError(f"{label} has no {LOGITS} output, so it is not a causal LM ({', '.join(outputs)})",
                            "qeff eval measures causal LM exports and their rewrites")
        self.output = LOGITS
        self.inputs = set(inputs)
        shape = inputs[INPUT_IDS].shape
        batch, seq = _static(shape[0]), _static(shape[1]) if len(shape) > 1 else None
        if batch is not None:
            self.rows, self.fixed_rows = batch, True
        self.seq = seq
        if seq is not None:  # a model bound to one length sees windows of exactly one more token
            self.max_window = seq + 1
        dims = next(o for o in self.session.get_outputs() if o.name == self.output).shape
        self.vocab = _static(dims[-1]) if dims else None
        self.label = label

    def logits(self, windows: np.ndarray, context: int) -> np.ndarray:
        ids = np.ascontiguousarray(windows[:, :-1])
        if self.seq is not None and ids.shape[1] != self.seq:
            raise QeffError(f"{self.label} takes exactly {self.seq} tokens per call; the window is "
                            f"{windows.shape[1]}", f"use --window {self.seq + 1}")
        feeds = {INPUT_IDS: ids}
        if ATTENTION_MASK in self.inputs:
            feeds[ATTENTION_MASK] = np.ones_like(ids)
        if POSITION_IDS in self.inputs:
            feeds[POSITION_IDS] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        out = self.session.run([self.output], feeds)[0]
        if out.ndim != 3 or out.shape[1] != ids.shape[1]:
            raise QeffError(f"{self.label}'s {self.output} has shape {out.shape}, not one row per token",
                            "a model that returns only the last token's logits needs a KV cache to be evaluated")
        return out[:, context - 1:]

    def close(self) -> None:
        self.session = None


class KVScorer(Scorer):
    kind = "kv"

    def __init__(self, model: str | os.PathLike | bytes, label: str, ctx_len: int | None = None) -> None:
        from qeff.runtime import OrtSession
        from qeff.runtime.generate import context_length, full_batch_size, prefill_length

        self.session = OrtSession(model, ctx_len=ctx_len)
        self.label = label
        names = set(self.session.input_names)
        if not {INPUT_IDS, POSITION_IDS} <= names:
            raise QeffError(f"{label} has a cache but no {INPUT_IDS}/{POSITION_IDS} inputs",
                            "evaluate a model written by the kv pass")
        self.continuous = BATCH_INDEX in names
        ctx = context_length(self.session)
        if ctx is None:
            raise QeffError(f"the cache length of {label} is unknown", "pass --ctx-len")
        self.max_window = ctx + 1  # the last token of a window is only scored, never fed
        ids = self.session.spec(INPUT_IDS).shape
        batch, self.seq = _static(ids[0]), _static(ids[1])
        if self.continuous:
            self.rows, self.fixed_rows = full_batch_size(self.session), True
        elif batch is not None:
            self.rows, self.fixed_rows = batch, True
        self.chunk = prefill_length(self.session, None, ctx)  # the prefill chunk generate would use
        self.decode_len = self.seq or 1
        self.vocab = self.session.vocab_size

    def _call(self, ids: np.ndarray, pos: np.ndarray, batch_index: np.ndarray | None = None) -> np.ndarray:
        feeds = {INPUT_IDS: ids, POSITION_IDS: pos}
        if batch_index is not None:
            feeds[BATCH_INDEX] = batch_index
        return self.session.run(feeds)[LOGITS]

    def _last_row(self, logits: np.ndarray, row: int, offset: int) -> np.ndarray:
        return logits[row, 0 if logits.shape[1] == 1 else offset]

    def _prefill(self, windows: np.ndarray, context: int, out: np.ndarray) -> None:
        rows = len(windows)
        groups = [[r] for r in range(rows)] if self.continuous else [list(range(rows))]
        last = context - 1
        for group in groups:
            index = np.array([[group[0]]], np.int64) if self.continuous else None
            for c in range(math.ceil(context / self.chunk)):
                lo, hi = c * self.chunk, min(context, (c + 1) * self.chunk)
                ids = np.zeros((len(group), self.chunk), np.int64)
                pos = np.full((len(group), self.chunk), -1, np.int64)
                ids[:, :hi - lo] = windows[group, lo:hi]
                pos[:, :hi - lo] = np.arange(lo, hi)
                logits = self._call(ids, pos, index)
                if lo <= last < hi:
                    for i, r in enumerate(group):
                        out[r, 0] = self._last_row(logits, i, last - lo)

    def logits(self, windows: np.ndarray, context: int) -> np.ndarray:
        rows, window = windows.shape
        if window > self.max_window:
            raise QeffError(f"a window of {window} tokens does not fit {self.label}'s cache of "
                            f"{self.max_window - 1}", f"use --window {self.max_window} or less")
        out = np.empty((rows, window - context, self.vocab or 0), np.float32) if self.vocab else None
        self.session.reset()
        if out is None:  # the vocabulary is learnt from the first call
            probe = self._call(np.zeros((rows, self.decode_len), np.int64),
                               np.full((rows, self.decode_len), -1, np.int64),
                               np.arange(rows, dtype=np.int64)[:, None] if self.continuous else None)
            self.vocab = probe.shape[-1]
            out = np.empty((rows, window - context, self.vocab), np.float32)
        self._prefill(windows, context, out)
        index = np.arange(rows, dtype=np.int64)[:, None] if self.continuous else None
        for step, t in enumerate(range(context, window - 1), start=1):
            ids = np.zeros((rows, self.decode_len), np.int64)
            pos = np.full((rows, self.decode_len), -1, np.int64)
            ids[:, 0], pos[:, 0] = windows[:, t], t
            logits = self._call(ids, pos, index)
            out[:, step] = logits[:, 0]
        return out

    def close(self) -> None:
        self.session.close()


def has_cache(model: str | os.PathLike | bytes) -> bool:
    """True when the model takes a KV cache (inputs named as the contract names cache inputs)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(os.fspath(model),
                                                                                     load_external_data=False)
    return any(is_cache_input(i.name) for i in proto.graph.input)


def open_scorer(model: str | os.PathLike | bytes, label: str, *, kv: bool, ctx_len: int | None = None) -> Scorer:
    return KVScorer(model, label, ctx_len) if kv else PlainScorer(model, label)
