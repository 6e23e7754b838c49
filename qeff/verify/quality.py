"""``--verify`` of a lossy pipeline on a text: how much perplexity and top-1 agreement it cost.

A quantized model never matches its source to a tolerance, and "the outputs are finite" says
nothing about quality. When a text is at hand (``--verify-text FILE``, or the held-out split
when the model uses the reference model's tokenizer), the rewritten model is evaluated against
its input with :func:`qeff.evaluation.evaluate` (in fp16 simulation when fp16clip ran) and fails
when the perplexity rises by more than ``max_perplexity_increase`` (relative) or fewer than
``min_top1_agreement`` of its top-1 tokens agree with the input's.

The defaults come from the reference model (README, "Accuracy"): MXFP6 weights change its
perplexity by +0.01 % and agree on 95.4 % of top-1 tokens, passing with room; MXFP4 (+1.3 %,
82 %) fails.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_PERPLEXITY_INCREASE", "DEFAULT_MIN_TOP1_AGREEMENT", "QualityThresholds", "text_quality",
           "verification_text"]

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from qeff.errors import QeffError

DEFAULT_MAX_PERPLEXITY_INCREASE = 0.05
DEFAULT_MIN_TOP1_AGREEMENT = 0.90


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
    max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE
    min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_perplexity_increase) and self.max_perplexity_increase >= 0):
            raise QeffError(f"max perplexity increase {self.max_perplexity_increase} is not a number >= 0",
                            "e.g. --max-perplexity-increase 0.05 (5 %)")
        if not (math.isfinite(self.min_top1_agreement) and 0 <= self.min_top1_agreement <= 1):
            raise QeffError(f"min top-1 agreement {self.min_top1_agreement} is not between 0 and 1",
                            "e.g. --min-top1-agreement 0.9")


def verification_text(model: str | os.PathLike, text: str | os.PathLike | None) -> tuple[Path | None, Path] | None:
    """(the text file or None for the held-out split, the tokenizer) when a text is available for
    ``model``; None when not (no text given and the model is not the reference model's)."""
    from qeff.evaluation import find_tokenizer, read_text
    from qeff.reference import is_reference_tokenizer

    if text is not None:
        read_text(text)  # refused before any pass runs: missing, empty or not UTF-8
        try:
            return Path(text), find_tokenizer(model)
        except QeffError as e:
            raise QeffError(f"--verify-text needs the model's tokenizer: {e.message}",
                            "put its tokenizer.json beside the model") from None
    try:
        tokenizer = find_tokenizer(model)
    except QeffError:
        return None
    return (None, tokenizer) if is_reference_tokenizer(tokenizer) else None


def text_quality(reference: Path, candidate: Path, *, text: Path | None, tokenizer: Path,
                 thresholds: QualityThresholds, ctx_len: int | None = None) -> dict[str, Any]:
    """Evaluate ``candidate`` (already an fp16 simulation when one is wanted) against
    ``reference``; the result's ``passed`` applies ``thresholds``."""
    from qeff.evaluation import evaluate

    result = evaluate(candidate, reference=reference, text=text, tokenizer=tokenizer, ctx_len=ctx_len)
    change = result.perplexity_change
    passed = bool(result.nonfinite == 0 and change is not None and change <= thresholds.max_perplexity_increase
                  and result.top1_agreement >= thresholds.min_top1_agreement)
    return {"text": result.text, "tokens": result.tokens, "perplexity": result.perplexity,
            "reference_perplexity": result.reference_perplexity, "perplexity_change": change,
            "top1_agreement": result.top1_agreement, "kl_mean": result.kl_mean, "kl_max": result.kl_max,
            "max_perplexity_increase": thresholds.max_perplexity_increase,
            "min_top1_agreement": thresholds.min_top1_agreement, "passed": passed}
