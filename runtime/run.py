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


def encoder_batch(session: Session, prompts: list[list[int]], pad_id: int = 0) -> dict[str, Any]:
    """A right-padded batch for a model without a KV cache: input_ids, attention_mask and, when
    the model takes them, zero token_type_ids."""
    import numpy as np

    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, np.int64)
    mask = np.zeros((len(prompts), longest), np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in session.input_names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    unknown = [n for n in session.input_names if n not in feeds]
    if unknown:
        raise QeffError(f"the model takes inputs qeff run cannot fill: {', '.join(unknown)}",
                        "run it from Python with Session.run")
    return feeds


def describe_outputs(outputs: dict[str, Any], mask: Any) -> list[str]:
    """One line per output and row: the shape, and what a user reads off it."""
    import numpy as np

    lines = []
    for name, array in outputs.items():
        lines.append(f"{name} {tuple(array.shape)}")
        for r in range(array.shape[0]):
            row = array[r]
            real = int(mask[r].sum())
            if name in ("start_logits", "end_logits"):
                lines.append(f"  [{r}] most likely position {int(np.argmax(row[:real]))}")
            elif name == "logits" and row.ndim == 1:
                lines.append(f"  [{r}] label {int(np.argmax(row))} (scores {np.round(row, 3).tolist()})")
            elif row.ndim == 1:
                lines.append(f"  [{r}] norm {float(np.linalg.norm(row)):.4f}, first {np.round(row[:4], 4).tolist()}")
            else:
                lines.append(f"  [{r}] {real} real positions, mean {float(row[:real].mean()):.4f}")
    return lines
