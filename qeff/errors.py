"""Error types of qeff-opt.

Every error a user can cause (a bad file, a bad option, a graph a pass cannot handle) is a
:class:`QeffError`. The CLI prints it as one line and exits with code 2; anything else is a bug
and shows a traceback hint instead.
"""

from __future__ import annotations

__all__ = [
    "QeffError",
    "ModelLoadError",
    "ManifestError",
    "OutputPathError",
    "PassOptionError",
    "PassSequenceError",
    "UnsupportedGraphError",
    "VerificationError",
    "ExportError",
    "MissingDependencyError",
]


class QeffError(Exception):
    """A problem with the user's input: reported as one line, exit code 2.

    ``hint`` says what to do about it and is appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text = f"{text} — {' '.join(self.hint.split())}"
        return text


class ModelLoadError(QeffError):
    """The input is not a readable ONNX model (or its external data is missing or unsafe)."""


class ManifestError(QeffError):
    """The manifest beside a model (``<name>.qeff.json``) does not fit its schema."""


class OutputPathError(QeffError):
    """The output path cannot be written (same as the input, unwritable folder, …)."""


class PassOptionError(QeffError):
    """A pass name or a pass option in a ``--passes`` list is unknown or malformed."""


class PassSequenceError(QeffError):
    """The passes requested cannot run in this order on this model."""


class UnsupportedGraphError(QeffError):
    """A pass did not find the structure it rewrites; nothing was written."""


class VerificationError(QeffError):
    """``--verify`` found outputs that differ by more than the tolerance."""


class ExportError(QeffError):
    """Exporting a Hugging Face model to ONNX failed."""


class MissingDependencyError(QeffError):
    """An optional dependency (an extra) is not installed."""
