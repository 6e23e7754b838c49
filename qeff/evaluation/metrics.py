"""Running totals of what ``qeff eval`` reports, fed one batch of windows at a time, so that no
step holds the logits of the whole text.

Per scored token: its negative log-likelihood under the model (perplexity = exp of the mean),
whether the model's top-1 token is the text's next token, and, with a reference model, whether
the two top-1 tokens agree and the KL divergence KL(reference ‖ model) of the two next-token
distributions, in nats. Softmaxes are computed in float64.
"""

from __future__ import annotations

__all__ = ["Totals", "log_softmax"]

import dataclasses
import math

import numpy as np


CHUNK_ELEMENTS = 1 << 21  # logits per slice: 16 MB of float64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class Totals:
    tokens: int = 0
    nll: float = 0.0
    correct: int = 0
    ref_nll: float = 0.0
    agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    nonfinite: int = 0  # scored positions whose logits hold NaN or Inf

    def add(self, logits: np.ndarray, targets: np.ndarray, mask: np.ndarray,
            reference: np.ndarray | None = None) -> None:
        """``logits`` ``[rows, n, vocab]`` predict ``targets`` ``[rows, n]``; only ``mask`` counts.
        Positions go through in slices of at most ``CHUNK_ELEMENTS`` logits, so the float64
        temporaries stay small with a 128 k vocabulary."""
        step = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        rows = logits.reshape(-1, logits.shape[-1])
        refs = reference.reshape(-1, reference.shape[-1]) if reference is not None else None
        flat_targets, flat_mask = targets.reshape(-1), mask.reshape(-1)
        for lo in range(0, len(rows), step):
            hi = lo + step
            self._add(rows[lo:hi], flat_targets[lo:hi], flat_mask[lo:hi], refs[lo:hi] if refs is not None else None)

    def _add(self, logits: np.ndarray, targets: np.ndarray, mask: np.ndarray,
             reference: np.ndarray | None) -> None:
        finite = np.isfinite(logits).all(axis=-1)
        self.nonfinite += int((~finite & mask).sum())
        logp = log_softmax(np.where(np.isfinite(logits), logits, 0.0))
        picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        self.tokens += int(mask.sum())
        self.nll -= float(picked[mask].sum())
        top = logp.argmax(axis=-1)
        self.correct += int(((top == targets) & mask).sum())
        if reference is not None:
            ref = log_softmax(reference)
            self.ref_nll -= float(np.take_along_axis(ref, targets[..., None], axis=-1)[..., 0][mask].sum())
            self.agree += int(((ref.argmax(axis=-1) == top) & mask).sum())
            kl = (np.exp(ref) * (ref - logp)).sum(axis=-1)
            kl = np.maximum(kl[mask], 0.0)  # rounding can leave -1e-17 where the two agree
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max(initial=0.0)))

    @property
    def perplexity(self) -> float:
        """inf when any scored position's logits were NaN or Inf: a broken model has no perplexity."""
        if self.nonfinite:
            return math.inf
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def reference_perplexity(self) -> float:
        return math.exp(self.ref_nll / self.tokens) if self.tokens else math.nan
