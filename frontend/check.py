"""Numerical check of an export: the ONNX model under onnxruntime against the torch model.

The comparison runs a right-padded batch and looks only at valid (non-pad) tokens. Logits at
pad positions are not meaningful and legitimately differ: for a query row whose keys are all
masked, PyTorch's sdpa and the decomposed ONNX attention produce different (equally arbitrary)
values (notes/export.md §2, up to 1.7 for Llama sdpa).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from qeff.errors import ExportError

from ._deps import require_torch
from .export import takes_position_ids
from .inputs import padded_batch

logger = logging.getLogger(__name__)

__all__ = ["compare_with_onnxruntime"]


def compare_with_onnxruntime(
    model: Any, onnx_path: str | os.PathLike[str], *, seed: int = 1, batch: int = 2, seq: int = 7
) -> float:
    """Max absolute logits difference between ``model`` and ``onnx_path`` on valid tokens.

    The input is fresh random tokens drawn from ``seed``: row 0 of the batch is full, row 1 two
    tokens shorter (right padding), and so on. The default ``seq=7`` differs from the export's
    tracing length on purpose, so a model that baked in its example shape fails here.
    """
    torch, _ = require_torch()
    from qeff.common.onnxrt import onnxruntime_session

    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(int(seed))
    feeds = padded_batch(batch, seq, vocab, pad=2, generator=generator)
    if not takes_position_ids(model):
        del feeds["position_ids"]

    device = next(model.parameters()).device
    with torch.no_grad():
        on_device = {name: value.to(device) for name, value in feeds.items()}
        expected = model(**on_device, use_cache=False).logits.float().cpu().numpy()

    session = onnxruntime_session(onnx_path, purpose=" to check it against torch",
                                  hint="the exporter wrote a graph onnxruntime rejects; try the other --exporter")
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in feeds]
    if missing:
        raise ExportError(
            f"{onnx_path} has inputs {missing} that a plain causal-LM export does not have",
            "compare only models written by export_causal_lm",
        )
    (actual,) = session.run(["logits"], {name: feeds[name].numpy() for name in wanted})

    if actual.shape != expected.shape:
        raise ExportError(f"ONNX logits have shape {actual.shape}, torch gives {expected.shape}")
    valid = feeds["attention_mask"].numpy().astype(bool)
    diff = float(np.abs(actual[valid] - expected[valid]).max())
    logger.info("onnxruntime vs torch on %d valid tokens: max abs diff %.3g", int(valid.sum()), diff)
    return diff
