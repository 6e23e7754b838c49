"""Plausible inputs for a graph, generated from its own signature (for ``--verify`` and for
fp16clip's calibration)."""

from __future__ import annotations

__all__ = ["sample_inputs", "vocab_size"]

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qeff.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from qeff.errors import UnsupportedGraphError

# Symbolic dims whose name says they are a batch get a small batch; everything else is a
# sequence-like length long enough to exercise masks and padding.
DEFAULT_BATCH = 2
DEFAULT_LENGTH = 8


def _dim_value(dim: Any, dims: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    name = getattr(dim, "value", None) or ""
    if name in dims:
        return dims[name]
    if re.search(r"batch", name, re.IGNORECASE):
        return DEFAULT_BATCH
    return DEFAULT_LENGTH


# Generated inputs stay below this many bytes each: a declared dim of 2**62 is a broken model,
# not a request for exabytes.
MAX_INPUT_BYTES = 1 << 30


def _check_size(name: str, shape: tuple[int, ...], itemsize: int) -> None:
    if any(d < 0 for d in shape):
        raise UnsupportedGraphError(f"input {name!r} declares a negative dimension {shape}",
                                    "fix the input's shape in the model")
    size = itemsize
    for d in shape:
        size *= d
    if size > MAX_INPUT_BYTES:
        raise UnsupportedGraphError(
            f"input {name!r} declares shape {list(shape)} ({size:.3g} bytes); sample data for it would "
            f"exceed {MAX_INPUT_BYTES >> 20} MiB",
            "bind its dims to realistic sizes (e.g. the fixed pass) or leave out --verify")


def vocab_size(graph: ir.Graph, value: ir.Value) -> int | None:
    """The row count of the embedding table this ids input indexes, if it feeds a Gather."""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            if table is not None and table.shape is not None and isinstance(table.shape[0], int):
                return table.shape[0]
    return None


def sample_inputs(
    model: ir.Model, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Plausible inputs for a language-model-like graph; generic random data otherwise.

    ``input_ids`` are drawn below the embedding table's size, ``attention_mask`` right-pads
    the last row by a quarter of the sequence, ``position_ids`` count valid tokens as
    Hugging Face does. Other ints are zero, bools true, floats standard normal.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.shape is None or value.dtype is None:
            raise UnsupportedGraphError(
                f"input {value.name!r} has no declared shape or type, so --verify cannot "
                "generate data for it",
                "declare the input's shape in the model",
            )
        shape = tuple(_dim_value(d, dims) for d in value.shape)
        np_dtype = value.dtype.numpy()
        _check_size(name=value.name, shape=shape, itemsize=np.dtype(np_dtype).itemsize)
        name = value.name
        is_int = np.issubdtype(np_dtype, np.integer)
        if is_int and name.endswith(INPUT_IDS):
            vocab = vocab_size(model.graph, value) or 100
            feeds[name] = rng.integers(0, vocab, size=shape).astype(np_dtype)
        elif name == ATTENTION_MASK and len(shape) == 2:
            mask = np.ones(shape, dtype=np_dtype)
            if shape[0] > 1 and shape[1] > 2:
                mask[-1, shape[1] - max(1, shape[1] // 4) :] = 0
            feeds[name] = mask
        elif is_int:
            feeds[name] = np.zeros(shape, dtype=np_dtype)
        elif value.dtype == ir.DataType.BOOL:
            feeds[name] = np.ones(shape, dtype=bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np_dtype)
    if POSITION_IDS in feeds and ATTENTION_MASK in feeds:
        mask = feeds[ATTENTION_MASK].astype(np.int64)
        if feeds[POSITION_IDS].shape == mask.shape:
            feeds[POSITION_IDS] = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(
                feeds[POSITION_IDS].dtype
            )
    elif POSITION_IDS in feeds:
        pos = feeds[POSITION_IDS]
        if pos.ndim == 2:
            feeds[POSITION_IDS] = np.broadcast_to(np.arange(pos.shape[1]), pos.shape).astype(pos.dtype)
    return feeds
