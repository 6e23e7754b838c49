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
from .export import export_causal_lm, parameter_bytes
from .loading import load_causal_lm
from .prefix_check import DEFAULT_CHECK_LAYERS, PrefixCutNotFound, compare_prefix
from .streaming import StreamingUnsupported, export_folder_streaming
from .tiny import build_tiny_model

logger = logging.getLogger(__name__)

__all__ = ["CHECKS", "ExportResult", "export_model", "STREAMED_CHECK_MAX_BYTES"]

# The full check runs the torch model next to the whole ONNX model: twice the weights in memory,
# and for a streamed export a model it never loaded. "auto" runs it only up to this much float32
# parameter data and the prefix check (bounded memory at any size) above it.
STREAMED_CHECK_MAX_BYTES = 1 << 30

CHECKS = ("auto", "full", "prefix", "none")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote.

    ``seconds`` is the wall time of building/loading plus exporting (not the check). ``check``
    is the check that ran: ``"full"`` (``max_abs_diff`` is the onnxruntime-vs-torch logits
    difference on valid tokens), ``"prefix"`` (the difference of the hidden state after the
    first ``checked_layers`` decoder layers) or None (not checked; ``max_abs_diff`` is None).
    """

    path: Path
    architecture: str
    exporter: str
    opset: int
    num_parameters: int
    seconds: float
    max_abs_diff: float | None
    inputs: list[str]
    check: str | None = None
    checked_layers: int | None = None


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
    check: bool | str = True,
    check_layers: int = DEFAULT_CHECK_LAYERS,
    progress: bool = True,
    streaming: bool = True,
) -> ExportResult:
    """Export a local Hugging Face folder (``source``) or a tiny random model (``tiny``) to ``output``.

    Exactly one of ``source`` and ``tiny`` must be given. ``seed`` randomizes the tiny model's
    parameters; it is ignored for ``source``.

    ``check`` compares the written file under onnxruntime with torch on a right-padded batch:
    ``"full"`` the logits of the whole model (:mod:`.check`: the torch model and the whole ONNX
    model in memory at once; a streamed export loads the model for it); ``"prefix"`` the hidden
    state after the first ``check_layers`` decoder layers, torch reading the checkpoint module
    by module and onnxruntime running the file cut after those layers (:mod:`.prefix_check`: a
    few hundred MB of weights at most, whatever the size of the model); ``"auto"`` (and True)
    the full check up to :data:`STREAMED_CHECK_MAX_BYTES` of float32 parameters and the prefix
    check above; ``"none"`` (and False) no check. A prefix check that cannot find the layers in
    the graph is skipped with a warning. The result's ``check`` says which check ran.

    A ``source`` folder is exported by streaming (:mod:`.streaming`): its weights go from the
    safetensors files to the ONNX data file without being loaded, and ``external_data`` ``None``
    then means external, with either exporter. ``streaming=False`` and checkpoints stored in a
    layout that is not streamed (logged) load the whole model instead. The checks are described
    above.
    """
    if (source is None) == (tiny is None):
        raise ExportError(
            "give exactly one model to export",
            "either source (a local Hugging Face folder) or tiny (an architecture name)",
        )
    mode = _check_mode(check, check_layers)
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

    if source is not None:
        _record_checkpoint(path, Path(source))
    size = streamed.parameter_bytes if streamed is not None else parameter_bytes(model)
    ran, diff, layers = _check(mode, path, size, model=model, source=source, layers=check_layers,
                               attn_implementation=attn_implementation)
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
        check=ran,
        checked_layers=layers,
    )
    logger.info("exported %s: %s", result.architecture, result)
    return result


def _record_checkpoint(path: Path, source: Path) -> None:
    """Name the checkpoint folder in the model's metadata (``qeff eval`` finds the tokenizer
    there; the passes carry metadata through). Only the graph file is rewritten, atomically:
    external weights are neither read nor touched."""
    import onnx

    from qeff.contract import CHECKPOINT_METADATA

    proto = onnx.load(str(path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != CHECKPOINT_METADATA]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=CHECKPOINT_METADATA, value=str(source.resolve()))
    staged = path.with_name(f".{path.name}.{os.getpid()}.metadata")
    try:
        onnx.save(proto, str(staged))
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def _check_mode(check: bool | str | None, layers: int) -> str:
    """``check`` as one of :data:`CHECKS`; refused before the export when it is not one."""
    if check is True:
        mode = "auto"
    elif check is False or check is None:
        mode = "none"
    else:
        mode = str(check)
    if mode not in CHECKS:
        raise ExportError(f"unknown check {check!r}", f"choose one of: {', '.join(CHECKS)}")
    if mode in ("auto", "prefix") and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ExportError(f"cannot check {layers!r} layers", "check_layers is a count of decoder layers, at least 1")
    return mode


def _check(
    mode: str, path: Path, size: int, *, model: object, source: str | os.PathLike[str] | None, layers: int,
    attn_implementation: str,
) -> tuple[str | None, float | None, int | None]:
    """Run the check ``mode`` asks for on a model of ``size`` float32 bytes: (the check that ran,
    its difference, the layers it compared). ``model`` is the torch model when the export had it
    in memory, else None (the prefix check then reads ``source`` module by module)."""
    if mode == "none":
        return None, None, None
    if mode == "full" or (mode == "auto" and size <= STREAMED_CHECK_MAX_BYTES):
        if model is None:
            logger.info("loading %s (%.1f GB of float32 weights) for the full check", source, size / 1e9)
            model = load_causal_lm(source, attn_implementation=attn_implementation)
        return "full", compare_with_onnxruntime(model, path), None
    try:
        if model is not None:
            result = compare_prefix(path, model=model, layers=layers)
        else:
            result = compare_prefix(path, folder=source, layers=layers, attn_implementation=attn_implementation)
    except PrefixCutNotFound as reason:
        logger.warning("not comparing %s with torch: the first %d layers cannot be checked alone: %s",
                       path, layers, reason)
        return None, None, None
    return "prefix", result.max_abs_diff, result.layers
