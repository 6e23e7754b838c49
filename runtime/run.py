"""``qeff run``: open a model or a compiled QPC, turn text or ids into prompts, generate with a
streamed, incrementally decoded output, or run an encoder on a padded batch; the CLI only
parses options and prints what these return."""

from __future__ import annotations

__all__ = ["open_session", "load_tokenizer", "parse_input_ids", "read_prompts", "encode_prompts", "TextStream",
           "run_encoder", "encoder_batch", "describe_outputs", "generation_lines", "write_json"]

import json

import os
from pathlib import Path
from typing import Any

from qeff.errors import QeffError
from qeff.runtime.session import Session


def open_session(target: str | os.PathLike, *, ctx_len: int | None = None, full_batch_size: int | None = None,
                 device_id: int = 0, prepack: bool = False) -> Session:
    """An OrtSession for an ``.onnx`` file (``prepack``: see :class:`OrtSession`), an
    AicSession for a compile folder or QPC."""
    path = Path(target)
    if path.is_file() and path.suffix == ".onnx":
        from qeff.runtime.ort import OrtSession

        return OrtSession(path, ctx_len=ctx_len, full_batch_size=full_batch_size, prepack=prepack)
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


_INT64_MAX = 2**63 - 1


def parse_input_ids(text: str) -> list[int]:
    """Token ids from ``5,9,3`` (commas and/or spaces): whole numbers from 0 to int64's max."""
    ids = []
    for item in text.replace(",", " ").split():
        # Digits only: int() would also take "+5", "5_000" or non-ASCII digits.
        if item.startswith("-") and item[1:].isascii() and item[1:].isdigit():
            raise QeffError(f"--input-ids {text!r} has a negative id {item}; token ids are >= 0",
                            "e.g. --input-ids 5,9,3")
        if not (item.isascii() and item.isdigit()):
            raise QeffError(f"--input-ids {text!r} is not a list of integers: {item!r} is not a whole number",
                            "e.g. --input-ids 5,9,3")
        # Checked by length first: int() refuses strings of more than 4300 digits.
        value = int(item) if len(item.lstrip("0")) <= 19 else _INT64_MAX + 1
        if value > _INT64_MAX:
            shown = item if len(item) <= 40 else f"{item[:20]}…({len(item)} digits)"
            raise QeffError(f"--input-ids has id {shown}, beyond the largest int64 ({_INT64_MAX})",
                            "check the ids, e.g. --input-ids 5,9,3")
        ids.append(value)
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


def read_prompts(prompts: list[str] | None, text_file: str | os.PathLike | None) -> list[str]:
    """The text inputs: ``--prompt`` values, or one per non-empty line of ``--text-file``."""
    if text_file is None:
        return list(prompts or [])
    path = Path(text_file)
    if not path.is_file():
        raise QeffError(f"--text-file {path} does not exist", "give a file with one input per line")
    try:
        text = path.read_text(encoding="utf-8")  # not the locale's encoding: the same file reads the same everywhere
    except UnicodeDecodeError as e:
        raise QeffError(f"--text-file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                        "save the file as UTF-8") from None
    except OSError as e:
        raise QeffError(f"--text-file {path} cannot be read: {e.strerror or e}", "check its permissions") from None
    return [line for line in text.splitlines() if line.strip()]


def encode_prompts(texts: list[str], input_ids: list[str] | None, tokenizer: Any, *,
                   special_tokens: bool) -> list[list[int]]:
    """Token ids per prompt, from text (with ``tokenizer``) or from ``--input-ids`` strings."""
    if bool(texts) == bool(input_ids):
        raise QeffError("give --prompt or --text-file (with --tokenizer), or --input-ids", "e.g. --input-ids 5,9,3")
    if texts and tokenizer is None:
        raise QeffError("--prompt and --text-file need --tokenizer DIR", "or pass token ids with --input-ids")
    if texts:
        prompts = [tokenizer.encode(t, add_special_tokens=special_tokens) for t in texts]
    else:
        prompts = [parse_input_ids(t) for t in input_ids or ()]
    if any(not p for p in prompts):
        raise QeffError("a prompt encodes to no tokens", "use a longer prompt")
    return prompts


class TextStream:
    """Turns each generated token into the text it adds: the whole continuation is decoded
    again and only the new suffix is returned, so tokens that form one character together
    (byte-level BPE) print correctly. Without a tokenizer each token prints as its id."""

    def __init__(self, tokenizer: Any, prompts: int) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(prompts)]
        self.shown: list[str] = ["" for _ in range(prompts)]

    def __call__(self, row: int, token: int) -> str:
        if self.tokenizer is None:
            return f"{token} "
        self.tokens[row].append(token)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        piece, self.shown[row] = text[len(self.shown[row]):], text
        return piece

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, tokens))
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def run_encoder(session: Session, prompts: list[list[int]], tokenizer: Any) -> tuple[dict[str, Any], list[str]]:
    """One batched call of a model without a KV cache: (outputs, a line per output and row)."""
    feeds = encoder_batch(session, prompts, pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
    outputs = session.run(feeds)
    return outputs, describe_outputs(outputs, feeds["attention_mask"])


def generation_lines(result: Any, prompts: int, stream: TextStream) -> list[str]:
    """The text of each prompt (for a batch) and the stats, as ``qeff run`` prints them."""
    lines = []
    if prompts > 1:
        lines += [f"[{i}] {stream.decode(tokens)}" for i, tokens in enumerate(result.tokens)]
    st = result.stats
    lines.append(f"prompts {prompts}, prompt tokens {st.prompt_tokens}, generated {st.generated_tokens}")
    lines.append(f"TTFT {st.ttft_s * 1000:.1f} ms · decode {st.decode_tokens_per_s:,.1f} tokens/s · "
                 f"total {st.total_tokens_per_s:,.1f} tokens/s · end to end {st.e2e_s:.3f} s")
    return lines


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``--stats-json``: the tokens and stats of a generation, or an encoder's outputs."""
    from qeff.common.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
