"""fp16clip: keep a float32 graph finite when the card computes it in fp16 (DESIGN §3.3)."""

from __future__ import annotations

__all__ = ["FP16ClipPass", "FP16ClipOptions"]

import dataclasses
import logging
import os
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qeff.errors import PassOptionError
from qeff.passes.fp16 import calibration
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.fp16.masks import FP16_MAX, rewrite_additive_masks, safe_select_fills
from qeff.common.progress import bytes_progress

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # elements per read when scanning a large initializer (float64 temporaries: 8 MB each)


@dataclasses.dataclass(frozen=True)
class FP16ClipOptions:
    # Every generated sample is held in memory and run once: beyond a few thousand it is a typo.
    calibrate: int = dataclasses.field(default=0, metadata={
        "help": "run the fp32 model on N generated sample inputs and flag activations beyond fp16 range (0: off)",
        "min": 0, "max": 10_000})
    samples: str | None = dataclasses.field(default=None, metadata={
        "help": ".npz of calibration inputs: one array per input name, first axis = sample"})
    margin: float = dataclasses.field(default=1.0, metadata={
        "help": "flag an activation when its observed |max| × margin exceeds 65504", "above": 0})
    action: Literal["fp32", "clamp"] = dataclasses.field(default="fp32", metadata={
        "help": "fp32: list flagged activations for the compiler's -node-precision-info (accurate); "
                "clamp: clip them to ±65504 (no fp32 on the card, values beyond the range are lost)"})
    rescale_norms: bool = dataclasses.field(default=True, metadata={
        "help": "rescale a flagged RMSNorm square by a power of two instead of clamping or listing it (exact)"})


class FP16ClipPass(QeffPass):
    """Make additive masks selects, clip constants to fp16 range, and deal with activations that overflow.

    Rules:
    1. ``Add(scores, mask)`` feeding a Softmax, where ``mask`` derives from a sentinel constant
       ≤ −65504 (finfo.min or −inf, through any ops but a matrix product), gets a
       ``Where(mask < −32752, −65504, ·)`` after it: the sentinel never reaches the Softmax, so
       a fully masked row gives a uniform softmax instead of NaN and visible scores are unchanged.
    2. A select that already masks scores before a Softmax (``Where(c, scores, sentinel)``)
       gets the fill −65504 instead of the sentinel.
    3. Every other float constant (initializers, ``Constant``, ``ConstantOfShape`` values) with
       finite values beyond ±65504 is clipped to ±65504, tensor by tensor. Infinities are kept.
       (This is also what makes ``(1 − mask) × finfo.min`` safe: in fp16, finfo.min is −inf and
       0 × −inf is NaN.)
    4. With ``calibrate=N`` (or ``samples=``) the fp32 model runs in onnxruntime and every float
       activation whose |max| × ``margin`` exceeds 65504 is flagged. A flagged RMSNorm square is
       rescaled by a power of two (exact); the rest are listed in a ``-node-precision-info`` YAML
       (``action=fp32``, the default; its path goes into the manifest) or get a
       ``Clip(±65504)`` (``action=clamp``).
    """

    name = "fp16clip"
    summary = "fp16 safety: additive masks become selects, constants clipped to ±65504, optional calibration"
    Options = FP16ClipOptions

    def requires(self, model: ir.Model) -> None:
        if self.options.margin <= 0:
            raise PassOptionError(f"fp16clip: margin={self.options.margin} must be positive", "e.g. margin=1.5")
        if self.options.calibrate < 0:
            raise PassOptionError(f"fp16clip: calibrate={self.options.calibrate} must be 0 or more", "e.g. calibrate=8")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        graph = model.graph
        ShapeInferencePass(strict_mode=False)(model)  # element types for the constants the rules add
        masks = rewrite_additive_masks(graph)
        fills = safe_select_fills(graph)
        if masks or fills:
            RemoveUnusedNodesPass()(model)  # drops the replaced sentinels too
        clipped = _clip_constants(graph, self.progress)
        details: dict[str, Any] = {"masks_rewritten": masks, "select_fills": fills, "constants_clipped": clipped}
        modified = bool(masks or fills or clipped)
        fp32_nodes: list[str] = []
        if options.calibrate or options.samples:
            feeds = calibration.calibration_feeds(model, options.calibrate, options.samples)
            peaks = calibration.activation_peaks(model, feeds)
            flagged = {n: p for n, p in peaks.items() if not np.isfinite(p) or p * options.margin > FP16_MAX}
            details["activations_flagged"] = {n: f"{p:.4g}" for n, p in flagged.items()}
            details["samples"] = len(feeds)
            if options.rescale_norms:
                details["norms_rescaled"] = calibration.rescale_norms(graph, flagged, options.margin)
            if options.action == "clamp":
                details["clamped"] = calibration.clamp(graph, list(flagged))
            else:
                fp32_nodes = details["fp32_nodes"] = sorted(flagged)
            details["action"] = options.action
            modified = modified or bool(details["activations_flagged"])
        manifest: dict[str, Any] = {"fp16": {"clipped": True, "fp32_nodes": len(fp32_nodes)}}
        if fp32_nodes:  # the compiler's -node-precision-info file, written beside the model
            text = "FP32NodeInstanceNames:\n" + "".join(f"  - {name}\n" for name in fp32_nodes)
            manifest["side_files"] = {"node_precision_info": (".npi.yaml", text)}
        return QeffPassResult(model, modified, details=details, manifest=manifest, fp16_keep=tuple(fp32_nodes))


# -- rule 3: constants -------------------------------------------------------------------------

def _finite_peak(array: np.ndarray) -> float:
    """The largest finite magnitude, read in chunks so a large weight is not copied whole."""
    peak = 0.0
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        chunk = np.abs(flat[start:start + _CHUNK].astype(np.float64))
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            peak = max(peak, float(chunk.max()))
    return peak


def _external_peak(tensor: ir.ExternalTensor) -> float:
    """The largest finite magnitude of an external tensor, read from its file chunk by chunk.

    Reading it through a mapping of the whole tensor would leave every scanned page resident
    until the tensor is released: an 8B model's 2 GB embedding would then count in full."""
    dtype = tensor.dtype.numpy()
    start = tensor.offset or 0
    length = tensor.length if tensor.length is not None else os.path.getsize(tensor.path) - start
    step = _CHUNK * dtype.itemsize
    peak = 0.0
    fd = os.open(tensor.path, os.O_RDONLY)
    try:
        for position in range(start, start + length, step):
            data = os.pread(fd, min(step, start + length - position), position)
            if len(data) % dtype.itemsize:
                raise ValueError(f"the data of {tensor.name!r} ends inside an element: the file is truncated")
            peak = max(peak, _finite_peak(np.frombuffer(data, dtype)))
    finally:
        os.close(fd)
    return peak


def _clip(tensor: ir.TensorProtocol) -> tuple[str, ir.Tensor] | None:
    """(old peak, clipped tensor) when a float tensor has finite values beyond ±65504."""
    if not tensor.dtype.is_floating_point() or tensor.dtype == ir.DataType.FLOAT16:
        return None
    if isinstance(tensor, ir.ExternalTensor):
        # Most weights need no clip: those are scanned without ever being mapped.
        if _external_peak(tensor) <= FP16_MAX:
            return None
    array = tensor.numpy()
    peak = _finite_peak(array)
    if peak <= FP16_MAX:
        del array
        _release(tensor)
        return None
    clipped = np.where(np.isfinite(array), np.clip(array, -FP16_MAX, FP16_MAX), array).astype(array.dtype)
    return f"{peak:.4g}", ir.tensor(clipped, name=tensor.name)


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap a weight read from external data once it is scanned: its pages would otherwise
    stay resident, and scanning every weight would hold the whole model."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone else still holds a view of it: leave it mapped
            pass


def _clip_constants(graph: ir.Graph, progress: bool) -> dict[str, str]:
    """Clip every float initializer and constant, one tensor at a time (weights stay memory-mapped
    until read, and only a tensor that changes is held in memory)."""
    clipped: dict[str, str] = {}
    initializers = [v for v in graph.initializers.values() if v.const_value is not None]
    with bytes_progress(sum(v.const_value.nbytes for v in initializers), "fp16clip: scanning weights",
                        progress) as advance:
        for value in initializers:
            result = _clip(value.const_value)
            advance(value.const_value.nbytes)
            if result is not None:
                clipped[value.name], value.const_value = result
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            result = _clip(node.attributes["value"].as_tensor())
            if result is not None:
                clipped[node.name], tensor = result
                node.attributes["value"] = ir.AttrTensor("value", tensor)
    return clipped
