"""``qeff run``: open a model or a compiled QPC, generate from prompts, stream, report the stats."""

from __future__ import annotations

__all__ = ["open_session", "load_tokenizer", "parse_input_ids"]

import os
from pathlib import Path
from typing import Any

from qeff.errors import QeffError
from qeff.runtime.session import Session


def open_session(target: str | os.PathLike, *, ctx_len: int | None = None, full_batch_size: int | None = None,
                 device_id: int = 0) -> Session:
    """An OrtSession for an ``.onnx`` file, an AicSession for a compile folder or QPC."""
    path = Path(target)
    if path.is_file() and path.suffix == ".onnx":
        from qeff.runtime.ort import OrtSession

        return OrtSession(path, ctx_len=ctx_len, full_batch_size=full_batch_size)
    if path.is_dir() or path.name == "programqpc.bin":
        from qeff.runtime.aic import AicSession

        return AicSession(path, device_id=device_id)
    raise QeffError(f"{path} is neither an .onnx model nor a compile folder",
                    "give the .onnx from qeff-opt, or the folder qeff compile wrote")


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer from a local folder (no hub)."""
    path = Path(folder)
    if not path.is_dir():
        raise QeffError(f"tokenizer folder {path} does not exist", "give the folder with tokenizer.json")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise QeffError("--tokenizer needs transformers", "pip install 'qeff-opt[export]'") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise QeffError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}",
                        "the folder needs tokenizer.json (or the files of a slow tokenizer)") from None


def parse_input_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise QeffError(f"--input-ids {text!r} is not a list of integers", "e.g. --input-ids 5,9,3") from None
    if not ids:
        raise QeffError("--input-ids is empty", "e.g. --input-ids 5,9,3")
    return ids
