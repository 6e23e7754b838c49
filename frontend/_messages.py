"""Turning a torch/transformers exception into the one-line reason of an ExportError.

Errors from the exporters and from transformers are built for tracebacks: multi-line, coloured,
wrapped in generic outer errors. The CLI prints a :class:`~qeff.errors.QeffError` as one line,
so only the part that says what went wrong is kept; the full exception stays chained as
``__cause__`` and is logged at debug level by the callers.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

__all__ = ["exception_reason"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 300


def exception_reason(exc: BaseException, *, first_sentence: bool = False) -> str:
    """The first non-empty line of the root cause of ``exc``, without terminal colours.

    The dynamo exporter wraps the real problem ("No ONNX function found for ...") in generic
    "Failed to convert ... step 3/3" errors, so the innermost explicit ``__cause__`` is used.
    ``first_sentence`` cuts paragraph-long messages (transformers writes those) after the
    first sentence.
    """
    root = exc
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    for line in _ANSI.sub("", str(root)).splitlines():
        line = line.strip()
        if not line:
            continue
        if first_sentence:
            line = line.split(". ")[0].rstrip(".")
        return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 1] + "…"
    return type(root).__name__
