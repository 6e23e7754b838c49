"""The reference model: a small Llama trained here on the documentation every Python ships.

It is what fidelity is measured on: a model that has learned something, so that a change of
perplexity or of the top-1 token means a change of quality rather than a flipped near-tie of
random weights. ``checkpoint/`` is an ordinary Hugging Face folder (config.json,
model.safetensors, tokenizer.json) with the held-out text beside it; ``train.py`` reproduces it
from a seed (``python -m qeff.reference.train``).
"""

from __future__ import annotations

__all__ = ["CHECKPOINT", "HELDOUT", "TOKENIZER", "heldout_text", "is_reference_tokenizer", "training_summary"]

import functools
import json
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().with_name("checkpoint")
TOKENIZER = CHECKPOINT / "tokenizer.json"
HELDOUT = CHECKPOINT / "heldout.txt"


def heldout_text() -> str:
    """The held-out split: topics the tokenizer and the model never saw."""
    return HELDOUT.read_text(encoding="utf-8")


def training_summary() -> dict:
    """What ``training.json`` records: settings, losses, held-out and unigram perplexities."""
    return json.loads((CHECKPOINT / "training.json").read_text())


@functools.lru_cache(maxsize=8)
def _bytes_of(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def is_reference_tokenizer(path: Path) -> bool:
    """True when ``path`` holds the reference model's tokenizer (same bytes)."""
    return Path(path).resolve() == TOKENIZER or _bytes_of(Path(path).resolve()) == _bytes_of(TOKENIZER)
