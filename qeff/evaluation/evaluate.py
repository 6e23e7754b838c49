"""``qeff eval``: what a model computes on a text, and how far that is from a reference model."""

from __future__ import annotations

__all__ = ["EvalResult", "evaluate", "DEFAULT_WINDOW"]

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qeff.errors import QeffError

from .metrics import Totals
from .scoring import Scorer, has_cache, open_scorer
from .text import Windows, cut_windows, find_tokenizer, load_tokenizer, read_text

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 128
# The float32 logits one call may return: 8 windows of a 2 k vocabulary, one of a 128 k one.
LOGITS_BUDGET = 128 << 20


@dataclasses.dataclass
class EvalResult:
    """Perplexity and top-1 accuracy of ``model`` on the text; with a reference, also its
    perplexity, the relative change, top-1 agreement and KL(reference ‖ model) per token."""

    model: str
    kind: str  # "plain" (full sequence) or "kv" (chunked prefill + decode through the cache)
    fp16_sim: bool
    text: str
    tokenizer: str
    window: int
    context: int
    windows: int
    tokens: int
    perplexity: float
    top1_accuracy: float
    nonfinite: int
    seconds: float
    reference: str | None = None
    reference_kind: str | None = None
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None

    @property
    def perplexity_change(self) -> float | None:
        """(perplexity / reference perplexity) - 1."""
        if self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["perplexity_change"] = self.perplexity_change
        # JSON has no inf/NaN: a model with NaN or Inf logits has no perplexity.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}

    def rich_table(self):
        """One column per model, one row per measure (fits an 80-column terminal)."""
        from rich.table import Table

        how = {"plain": "full sequence", "kv": "KV: prefill + decode"}
        table = Table(title=f"qeff eval — {self.tokens:,} tokens of {self.text} ({self.windows} windows of "
                            f"{self.window}, {self.context} of context)", title_justify="left")
        table.add_column("")
        table.add_column(Path(self.model).name, justify="right")
        if self.reference is not None:
            table.add_column(f"{Path(self.reference).name} (reference)", justify="right")

        def row(label: str, mine: str, theirs: str = "") -> None:
            table.add_row(label, mine, *([theirs] if self.reference is not None else []))

        row("run as", how[self.kind] + (", fp16 sim." if self.fp16_sim else ""),
            how.get(self.reference_kind or "", ""))
        row("perplexity", f"{self.perplexity:.3f}" if math.isfinite(self.perplexity) else "[bold red]NaN/Inf[/]",
            f"{self.reference_perplexity:.3f}" if self.reference_perplexity is not None else "")
        row("top-1 = next token", f"{self.top1_accuracy:.2%}")
        if self.reference is not None:
            change = self.perplexity_change
            row("Δ perplexity", f"{change:+.2%}" if math.isfinite(change) else "NaN/Inf")
            row("top-1 agreement", f"{self.top1_agreement:.2%}")
            row("KL mean / max (nats)", f"{self.kl_mean:.2e} / {self.kl_max:.2e}")
        return table


def fp32_nodes(model: Path, manifest) -> list[str]:
    """The values fp16clip kept in float32: the ``FP32NodeInstanceNames`` list ``model``'s manifest
    names (the compiler's ``-node-precision-info`` file); empty when there is none."""
    if manifest is None or not manifest.node_precision_info:
        return []
    npi = model.parent / manifest.node_precision_info
    if not npi.is_file():
        return []
    return [line.strip()[2:].strip() for line in npi.read_text().splitlines() if line.strip().startswith("- ")]


def _check_model_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise QeffError(f"{what} {path} does not exist", "give the .onnx file qeff export or qeff-opt wrote")


def _default_text(tokenizer: Path) -> tuple[str, str]:
    from qeff.reference import heldout_text, is_reference_tokenizer

    if is_reference_tokenizer(tokenizer):
        return heldout_text(), "the reference model's held-out split"
    raise QeffError("no text to evaluate on: the default is the reference model's held-out split, and this "
                    "model has another tokenizer", "give a UTF-8 text file with --text")


def _progress(total: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    TimeRemainingColumn(), transient=True, console=Console(stderr=True))


def evaluate(model: str | os.PathLike, *, reference: str | os.PathLike | None = None,
             text: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
             fp16_sim: bool = False, window: int | None = None, context: int | None = None,
             max_tokens: int | None = None, ctx_len: int | None = None, progress: bool = False) -> EvalResult:
    """Score ``model`` on ``text`` (default: the reference model's held-out split, when the model
    uses its tokenizer), next to ``reference`` when given (never in fp16 simulation).

    Plain exports run each window whole; KV models run as deployed (see
    :mod:`qeff.evaluation.scoring`). ``window`` (default 128, at most what every model's cache
    holds plus one) and ``context`` (default a quarter of the window) cut the text; see
    :mod:`qeff.evaluation.text`. ``max_tokens`` evaluates only the start of the text.
    """
    started = time.perf_counter()
    model = Path(model)
    _check_model_file(model, "model")
    if reference is not None:
        reference = Path(reference)
        _check_model_file(reference, "reference model")
    tok_path = find_tokenizer(model, tokenizer)
    if reference is not None and tokenizer is None:
        ref_tok = _find_optional(reference)
        if ref_tok is not None and ref_tok.read_bytes() != tok_path.read_bytes():
            raise QeffError(f"{model.name} and {reference.name} come with different tokenizers "
                            f"({tok_path} and {ref_tok})", "compare models of one checkpoint, or pass --tokenizer")
    tok = load_tokenizer(tok_path)
    if text is None:
        content, text_label = _default_text(tok_path)
    else:
        content, text_label = read_text(text), Path(text).name
    ids = tok.encode(content).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]

    with contextlib.ExitStack() as stack:
        source = model
        if fp16_sim:
            from qeff.contract import read_manifest
            from qeff.passes.fp16.simulation import simulation_beside

            manifest = read_manifest(model)
            source = stack.enter_context(simulation_beside(model, fp32_nodes(model, manifest)))
            if ctx_len is None and manifest is not None:  # the simulation has no manifest beside it
                ctx_len = manifest.ctx_len
        scorer = stack.enter_context(_closing(open_scorer(source, model.name, kv=has_cache(model), ctx_len=ctx_len)))
        ref_scorer = None
        if reference is not None:
            ref_scorer = stack.enter_context(_closing(open_scorer(reference, reference.name,
                                                                  kv=has_cache(reference), ctx_len=ctx_len)))
        _check_vocabularies(model, scorer, reference, ref_scorer, tok.get_vocab_size(), tok_path)
        window, context = _window_plan(window, context, [s for s in (scorer, ref_scorer) if s is not None])
        for s in (scorer, ref_scorer):
            if s is not None and not s.fixed_rows and s.vocab:
                s.rows = max(1, min(s.rows, LOGITS_BUDGET // (window * s.vocab * 4)))
        windows = cut_windows(np.asarray(ids), window, context)
        totals = _score(windows, scorer, ref_scorer, stack.enter_context(_progress(windows.scored, progress)))
    result = EvalResult(
        model=str(model), kind=scorer.kind, fp16_sim=fp16_sim, text=text_label, tokenizer=str(tok_path),
        window=window, context=context, windows=len(windows.starts), tokens=totals.tokens,
        perplexity=totals.perplexity, top1_accuracy=totals.correct / totals.tokens, nonfinite=totals.nonfinite,
        seconds=time.perf_counter() - started)
    if reference is not None:
        result.reference, result.reference_kind = str(reference), ref_scorer.kind
        result.reference_perplexity = totals.reference_perplexity
        result.top1_agreement = totals.agree / totals.tokens
        result.kl_mean, result.kl_max = totals.kl_sum / totals.tokens, totals.kl_max
    logger.info("evaluated %s: %s", model, result)
    return result


def _window_plan(window: int | None, context: int | None, scorers: list[Scorer]) -> tuple[int, int]:
    """(window, context): the default window is 128 tokens, or what the smallest cache holds."""
    limit = min([s.max_window for s in scorers if s.max_window] or [math.inf])
    if window is None:
        window = int(min(DEFAULT_WINDOW, limit))
    elif window > limit:
        raise QeffError(f"a window of {window} tokens is longer than the model takes ({int(limit)})",
                        f"use --window {int(limit)} or less")
    return window, context if context is not None else max(1, window // 4)


def _score(windows: Windows, scorer: Scorer, ref_scorer: Scorer | None, bar) -> Totals:
    """Every window through both models, a batch at a time, into running totals."""
    totals = Totals()
    task = bar.add_task("eval", total=windows.scored) if bar is not None else None
    offsets = np.arange(windows.context, windows.window)
    # Each scorer cuts a batch into the rows it takes (padding the last): any batch size works.
    for lo in range(0, len(windows.starts), scorer.rows):
        batch = list(range(lo, min(lo + scorer.rows, len(windows.starts))))
        tokens = windows.rows(batch)
        got = _batched(scorer, tokens, windows.context)
        ref = _batched(ref_scorer, tokens, windows.context) if ref_scorer is not None else None
        mask = offsets[None, :] >= np.asarray([windows.first[i] for i in batch])[:, None]
        totals.add(got, tokens[:, windows.context:], mask, ref)
        if bar is not None:
            bar.advance(task, int(mask.sum()))
    return totals


def _batched(scorer: Scorer, tokens: np.ndarray, context: int) -> np.ndarray:
    """A batch in the rows the scorer takes (one call per ``scorer.rows`` windows)."""
    if len(tokens) <= scorer.rows:
        return scorer.score(tokens, context)
    return np.concatenate([scorer.score(tokens[i:i + scorer.rows], context)
                           for i in range(0, len(tokens), scorer.rows)])


@contextlib.contextmanager
def _closing(scorer: Scorer) -> Iterator[Scorer]:
    try:
        yield scorer
    finally:
        scorer.close()


def _find_optional(model: Path) -> Path | None:
    try:
        return find_tokenizer(model)
    except QeffError:
        return None


def _check_vocabularies(model: Path, scorer: Scorer, reference: Path | None, ref_scorer: Scorer | None,
                        tokenizer_size: int, tokenizer: Path) -> None:
    if ref_scorer is not None and scorer.vocab and ref_scorer.vocab and scorer.vocab != ref_scorer.vocab:
        raise QeffError(f"{model.name} has a vocabulary of {scorer.vocab} tokens and {reference.name} of "
                        f"{ref_scorer.vocab}: they cannot be compared token by token",
                        "compare a model with a rewrite of itself or of its own checkpoint")
    for s, path in ((scorer, model), (ref_scorer, reference)):
        if s is not None and s.vocab and tokenizer_size > s.vocab:
            raise QeffError(f"the tokenizer {tokenizer} has {tokenizer_size} tokens, more than {path.name}'s "
                            f"vocabulary of {s.vocab}", "pass the tokenizer of the model's checkpoint with --tokenizer")
