"""What an evaluation reads: the text, the tokenizer, and the windows the tokens are cut into.

Windows follow the strided-perplexity recipe: ``window`` tokens per window, of which the first
``context`` are only context; consecutive windows overlap by ``context`` tokens, so every token
after the first ``context`` of the text is scored exactly once, each with at least ``context``
tokens before it. A KV model is driven the same way it is deployed: the context is its prompt
(chunked prefill) and each scored token is one decode step.
"""

from __future__ import annotations

__all__ = ["Windows", "cut_windows", "find_tokenizer", "load_tokenizer", "read_text"]

import dataclasses
import os
from pathlib import Path

import numpy as np

from qeff.contract import CHECKPOINT_METADATA
from qeff.errors import QeffError

TOKENIZER_FILE = "tokenizer.json"


def read_text(path: str | os.PathLike) -> str:
    """The file as UTF-8 text; a :class:`QeffError` when it is missing, empty or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise QeffError(f"text file {path} does not exist", "give a UTF-8 text file with --text")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QeffError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise QeffError(f"{path} is empty", "give a text of at least a few hundred words")
    return text


def _recorded_checkpoint(model: Path) -> Path | None:
    """The checkpoint folder the export recorded in the model's metadata, if any."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # the model's own loader reports a broken file with its own message
        return None
    for prop in proto.metadata_props:
        if prop.key == CHECKPOINT_METADATA and prop.value:
            return Path(prop.value)
    return None


def find_tokenizer(model: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """The ``tokenizer.json`` for ``model``: ``given`` (the file, or a folder holding it), else
    one beside the model, else one in the checkpoint folder its export recorded."""
    if given is not None:
        given = Path(given)
        found = given / TOKENIZER_FILE if given.is_dir() else given
        if not found.is_file():
            raise QeffError(f"no tokenizer at {given}" + (f" ({TOKENIZER_FILE} is missing)" if given.is_dir() else ""),
                            f"give a {TOKENIZER_FILE} file or the model folder that holds it")
        return found
    model = Path(model)
    beside = model.parent / TOKENIZER_FILE
    if beside.is_file():
        return beside
    checkpoint = _recorded_checkpoint(model)
    if checkpoint is not None and (checkpoint / TOKENIZER_FILE).is_file():
        return checkpoint / TOKENIZER_FILE
    raise QeffError(f"no tokenizer for {model.name}: none beside it and none in the folder it was exported from",
                    f"pass --tokenizer with the checkpoint folder (or its {TOKENIZER_FILE})")


def load_tokenizer(path: Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise QeffError("evaluation needs the tokenizers package", "pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions with its parser's message
        raise QeffError(f"{path} is not a tokenizer file: {str(e).strip().splitlines()[0][:200]}",
                        f"give the {TOKENIZER_FILE} a Hugging Face checkpoint ships") from None


@dataclasses.dataclass(frozen=True)
class Windows:
    """``starts[i]``: where window i begins in ``tokens``; ``first[i]``: its first scored offset
    (``context``, larger for a last window that overlaps the one before it further)."""

    tokens: np.ndarray
    window: int
    context: int
    starts: tuple[int, ...]
    first: tuple[int, ...]

    @property
    def scored(self) -> int:
        return sum(self.window - f for f in self.first)

    def rows(self, indices: list[int]) -> np.ndarray:
        return np.stack([self.tokens[self.starts[i]:self.starts[i] + self.window] for i in indices])


def cut_windows(tokens: np.ndarray, window: int, context: int) -> Windows:
    """Cut ``tokens`` into overlapping windows (see the module docstring)."""
    if not 1 <= context < window:
        raise QeffError(f"context {context} must be at least 1 and below the window of {window} tokens",
                        "e.g. --window 128 --context 32")
    n = len(tokens)
    if n < window:
        raise QeffError(f"the text is {n} tokens long, shorter than one window of {window} tokens",
                        "give a longer text, or a smaller --window")
    stride = window - context
    starts = list(range(0, n - window + 1, stride))
    first = [context] * len(starts)
    end = starts[-1] + window
    if end < n:  # the tail: one more window ending at the text's end, scoring what is left
        starts.append(n - window)
        first.append(window - (n - end))
    return Windows(np.asarray(tokens, dtype=np.int64), window, context, tuple(starts), tuple(first))
