"""The one verification result, and the one place that words it for people."""

from __future__ import annotations

__all__ = ["Verification", "describe", "failure_message"]

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class Verification:
    """What ``--verify`` found. ``max_rel`` and ``finite`` are set for an fp16 simulation;
    ``inputs``/``outputs`` for a same-inputs comparison; ``token_agreement``, ``steps``,
    ``prompts``, ``ctx_len`` and ``per_step`` for a comparison by generation."""

    method: str
    passed: bool
    tolerance: float
    max_abs: float
    reference: str | None = None
    max_rel: float | None = None
    finite: bool | None = None
    lossy: bool = False  # quantized: reported, and failed only on NaN/Inf unless a tolerance was given
    inputs: dict[str, list[int]] | None = None
    outputs: dict[str, dict[str, Any]] | None = None
    token_agreement: str | None = None
    steps: int | None = None
    prompts: list[int] | None = None
    ctx_len: int | None = None
    per_step: list[dict[str, Any]] | None = None
    # A lossy pipeline evaluated on a text (qeff.verify.quality): perplexity, agreement, limits.
    quality: dict[str, Any] | None = None

    @property
    def by_generation(self) -> bool:
        return self.token_agreement is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _size(v: Verification) -> str:
    if v.max_rel is not None:
        return f"max difference {v.max_rel:.3g} of the largest reference value"
    return f"max abs difference {v.max_abs:.3g}"


def describe(v: Verification) -> str:
    """One line: how the model was checked and what came out."""
    if v.by_generation:
        what = (f"KV model vs the original graph recomputing the sequence (prompts of "
                f"{', '.join(map(str, v.prompts or []))} tokens, ctx_len {v.ctx_len}): greedy tokens agree "
                f"{v.token_agreement} over {v.steps} steps, logits {_size(v)}")
    else:
        what = f"same inputs: {_size(v)} over outputs {', '.join(v.outputs or {})}"
    if v.finite is not None:
        what = f"fp16 simulation, {'finite' if v.finite else 'NaN or Inf'}; {what}"
    if v.quality is not None:
        q = v.quality
        what = (f"{what}; on {q['tokens']:,} tokens of {q['text']}: perplexity {q['reference_perplexity']:.3f} → "
                f"{q['perplexity']:.3f} ({_change(q)}, limit +{q['max_perplexity_increase']:.1%}), top-1 agreement "
                f"{q['top1_agreement']:.2%} (limit {q['min_top1_agreement']:.0%})")
        return f"{what} — {'passed' if v.passed else 'FAILED'}"
    if v.lossy:
        return f"{what} — quantized model, reported (only NaN/Inf fail without --tolerance or a text)"
    return f"{what} (tolerance {v.tolerance:g}) — {'passed' if v.passed else 'FAILED'}"


def _change(q: dict[str, Any]) -> str:
    change = q["perplexity_change"]
    return "NaN/Inf" if change is None or not math.isfinite(change) else f"{change:+.2%}"


def failure_message(v: Verification) -> str:
    """Why a verification failed, in one line (without the hint)."""
    q = v.quality
    if q is not None and not q["passed"] and (v.lossy or v.finite is not False):
        return (f"--verify failed: on {q['tokens']:,} tokens of {q['text']} the perplexity changed {_change(q)} "
                f"(limit +{q['max_perplexity_increase']:.1%}) and top-1 agreement is {q['top1_agreement']:.2%} "
                f"(limit {q['min_top1_agreement']:.0%}); nothing was written")
    by = f"{v.max_rel:.3g} of the largest reference value" if v.max_rel is not None else f"{v.max_abs:.3g}"
    if v.by_generation:
        what = f"greedy tokens agree {v.token_agreement}, logits differ by up to {by}"
    else:
        key = "max_rel" if v.max_rel is not None else "max_abs"
        worst = max(v.outputs or {"?": {}}, key=lambda k: (v.outputs or {}).get(k, {}).get(key, 0))
        what = f"output {worst!r} differs by {by}"
    if v.finite is False:
        what = f"the fp16 simulation gives NaN or Inf ({what})"
    return f"--verify failed: {what} (tolerance {v.tolerance:g}); nothing was written"
