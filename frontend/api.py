"""One-call export: build or load a causal LM, export it, read the result back and check it.

This is what the command line calls. It ties the other modules together and reports what was
written in an :class:`ExportResult`, with the facts read back from the file itself (opset,
input names) rather than from what was asked for.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qeff.errors import ExportError

from .check import compare_with_onnxruntime
from .export import export_causal_lm
from .loading import load_causal_lm
from .streaming import StreamingUnsupported, export_folder_streaming
from .tiny import build_tiny_model

logger = logging.getLogger(__name__)

__all__ = ["ExportResult", "export_model", "STREAMED_CHECK_MAX_BYTES"]

# The check compares with the torch model, which a streamed export never loads: it is loaded
# for the check only up to this much float32 parameter data, so that checking a small model
# stays the default and a large one is not pulled into memory after all.
STREAMED_CHECK_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote.

    ``seconds`` is the wall time of building/loading plus exporting (not the check);
    ``max_abs_diff`` is the onnxruntime-vs-torch logits difference on valid tokens, or None
    when the check was skipped.
    """

    path: Path
    architecture: str
    exporter: str
    opset: int
    num_parameters: int
    seconds: float
    max_abs_diff: float | None
    inputs: list[str]


def _read_back(path: Path) -> tuple[int, list[str]]:
    """The default-domain opset and the input names stored in the written model."""
    import onnx

    # The header only: weights may be gigabytes of external data.
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return opset, [value.name for value in model.graph.input]


def export_model(
    *,
    source: str | os.PathLike[str] | None = None,
    tiny: str | None = None,
    output: str | os.PathLike[str],
    exporter: str = "dynamo",
    opset: int | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
    external_data: bool | None = None,
    check: bool = True,
    progress: bool = True,
    streaming: bool = True,
) -> ExportResult:
    """Export a local Hugging Face folder (``source``) or a tiny random model (``tiny``) to ``output``.

    Exactly one of ``source`` and ``tiny`` must be given. ``seed`` randomizes the tiny model's
    parameters; it is ignored for ``source``. With ``check`` the export is compared with the
    torch model under onnxruntime on a right-padded batch.

    A ``source`` folder is exported by streaming (:mod:`.streaming`): its weights go from the
    safetensors files to the ONNX data file without being loaded, and ``external_data`` ``None``
    then means external. ``streaming=False``, the TorchScript exporter and checkpoints stored
    in a layout transformers converts while loading (logged) load the whole model instead. The
    check of a streamed export loads the model after the export, and only up to
    :data:`STREAMED_CHECK_MAX_BYTES` of parameters (above that it is skipped, with a warning).
    """
    if (source is None) == (tiny is None):
        raise ExportError(
            "give exactly one model to export",
            "either source (a local Hugging Face folder) or tiny (an architecture name)",
        )
    started = time.perf_counter()
    streamed = None
    model = None
    if source is not None and streaming:
        try:
            streamed = export_folder_streaming(
                source, output, exporter=exporter, opset=opset, external_data=external_data,
                attn_implementation=attn_implementation, progress=progress,
            )
        except StreamingUnsupported as reason:
            logger.warning("exporting %s with its weights in memory: %s", source, reason)
    if streamed is not None:
        path = streamed.path
        architecture, num_parameters = streamed.architecture, streamed.num_parameters
    else:
        if tiny is not None:
            model = build_tiny_model(tiny, seed=seed, attn_implementation=attn_implementation)
        else:
            model = load_causal_lm(source, attn_implementation=attn_implementation)
        path = export_causal_lm(
            model, output, exporter=exporter, opset=opset, external_data=external_data, progress=progress
        )
        architecture = str(getattr(model.config, "model_type", type(model).__name__))
        num_parameters = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - started

    diff = None
    if check and streamed is not None:
        if streamed.parameter_bytes <= STREAMED_CHECK_MAX_BYTES:
            model = load_causal_lm(source, attn_implementation=attn_implementation)
        else:
            logger.warning(
                "not comparing %s with torch: that would load %.1f GB of weights (the limit is %.1f GB)",
                path, streamed.parameter_bytes / 1e9, STREAMED_CHECK_MAX_BYTES / 1e9,
            )
    if check and model is not None:
        diff = compare_with_onnxruntime(model, path)
    opset_written, inputs = _read_back(path)
    result = ExportResult(
        path=path,
        architecture=architecture,
        exporter=exporter,
        opset=opset_written,
        num_parameters=num_parameters,
        seconds=seconds,
        max_abs_diff=diff,
        inputs=inputs,
    )
    logger.info("exported %s: %s", result.architecture, result)
    return result
