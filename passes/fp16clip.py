"""fp16clip: keep a float32 graph finite when the card computes it in fp16 (DESIGN §3.3)."""

from __future__ import annotations

__all__ = ["FP16ClipPass", "FP16ClipOptions"]

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qeff.errors import PassOptionError
from qeff.passes.base import QeffPass
from qeff.passes.fp16sim import float32_names
from qeff.passes.graph_edit import add_initializer
from qeff.passes.verify import onnxruntime_session

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
# The fill of a masked score: the most negative fp16 number. Nothing is added to it after the
# select, so it cannot overflow, and a row with every score masked gets a uniform softmax.
SAFE_FILL = -FP16_MAX
# Ops between a mask (or the scores) and the Softmax that do not change values.
_TRANSPARENT = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Expand", "Slice"}
_CHUNK = 1 << 24  # elements per read when scanning a large initializer


@dataclasses.dataclass(frozen=True)
class FP16ClipOptions:
    calibrate: int = dataclasses.field(default=0, metadata={
        "help": "run the fp32 model on N sample inputs and flag activations beyond fp16 range (0: off)"})
    samples: str | None = dataclasses.field(default=None, metadata={
        "help": ".npz of calibration inputs: one array per input name, first axis = sample"})
    margin: float = dataclasses.field(default=1.0, metadata={
        "help": "flag an activation when its observed |max| × margin exceeds 65504"})
    action: Literal["clamp", "fp32"] = dataclasses.field(default="clamp", metadata={
        "help": "clamp flagged activations to ±65504, or list them for the compiler's -node-precision-info"})


class FP16ClipPass(QeffPass):
    """Make additive masks selects, clip constants to fp16 range, and flag activations that overflow.

    Rules:
    1. ``Add(scores, mask)`` feeding a Softmax, where ``mask`` is a ``Where`` between 0 and a
       sentinel ≤ −65504 (finfo.min or −inf; through shape-only ops), becomes
       ``Where(mask == 0, scores, −65504)``: the sentinel is never added, so it cannot overflow
       to −inf, and a fully masked row gives a uniform softmax instead of NaN.
    2. A select that already masks scores before a Softmax (``Where(c, scores, sentinel)``)
       gets the fill −65504 instead of the sentinel.
    3. Every other float constant (initializers, ``Constant``, ``ConstantOfShape`` values) with
       finite values beyond ±65504 is clipped to ±65504, tensor by tensor. Infinities are kept.
    4. With ``calibrate=N`` (or ``samples=``) the fp32 model runs in onnxruntime and every float
       activation whose |max| × ``margin`` exceeds 65504 is flagged: ``action=clamp`` inserts a
       ``Clip(±65504)`` after it, ``action=fp32`` lists it in a ``-node-precision-info`` YAML
       (``FP32NodeInstanceNames``) whose path goes into the manifest.
    """

    name = "fp16clip"
    summary = "fp16 safety: additive masks become selects, constants clipped to ±65504, optional calibration"
    Options = FP16ClipOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.options.margin <= 0:
            raise PassOptionError(f"fp16clip: margin={self.options.margin} must be positive", "e.g. margin=1.5")
        graph = model.graph
        masks = _rewrite_additive_masks(graph)
        fills = _safe_select_fills(graph)
        if masks or fills:
            RemoveUnusedNodesPass()(model)  # drops the replaced sentinels too
        clipped = _clip_constants(graph)
        self.details = {"masks_rewritten": masks, "select_fills": fills, "constants_clipped": clipped}
        flagged: dict[str, float] = {}
        if self.options.calibrate or self.options.samples:
            flagged = _calibrate(model, self.options)
            if self.options.action == "clamp":
                ShapeInferencePass(strict_mode=False)(model)  # element types of the flagged values
                _clamp(graph, flagged)
            self.details["activations_flagged"] = {k: f"{v:.4g}" for k, v in flagged.items()}
            self.details["action"] = self.options.action
        modified = bool(masks or fills or clipped or flagged)
        return ir.passes.PassResult(model, modified)

    def update_manifest(self, manifest: dict[str, Any], model: ir.Model) -> None:
        fp32_nodes = sorted(self.details.get("activations_flagged", {})) if self.options.action == "fp32" else []
        manifest["fp16"] = {"clipped": True, "fp32_nodes": len(fp32_nodes)}
        if fp32_nodes:
            text = "FP32NodeInstanceNames:\n" + "".join(f"  - {name}\n" for name in fp32_nodes)
            manifest.setdefault("side_files", {})["node_precision_info"] = (".npi.yaml", text)


# -- rule 1 and 2: masks -----------------------------------------------------------------------

def _feeds_softmax(value: ir.Value) -> bool:
    for use in value.uses():
        node = use.node
        if node.op_type == "Softmax":
            return True
        if node.op_type in _TRANSPARENT and use.idx == 0 and _feeds_softmax(node.outputs[0]):
            return True
    return False


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a constant whose elements are all equal, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size > 4096 or not tensor.dtype.is_floating_point():
        return None
    array = tensor.numpy().astype(np.float64).reshape(-1)
    if array.size == 0 or not np.all(array == array[0]):
        return None
    return float(array[0])


def _is_sentinel(x: float | None) -> bool:
    return x is not None and x <= -FP16_MAX


def _mask_where(value: ir.Value) -> ir.Node | None:
    """The ``Where(c, 0, sentinel)`` (either order) that ``value`` is, through shape-only ops."""
    node = value.producer()
    while node is not None and node.op_type in _TRANSPARENT:
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Where":
        return None
    a, b = _scalar(node.inputs[1]), _scalar(node.inputs[2])
    if (a == 0 and _is_sentinel(b)) or (b == 0 and _is_sentinel(a)):
        return node
    return None


def _rewrite_additive_masks(graph: ir.Graph) -> list[str]:
    rewritten = []
    zero_checks: dict[ir.Value, ir.Value] = {}
    for node in list(graph):
        if node.op_type != "Add" or not _feeds_softmax(node.outputs[0]):
            continue
        for mask_index in (1, 0):
            mask, scores = node.inputs[mask_index], node.inputs[1 - mask_index]
            if mask is None or scores is None or _mask_where(mask) is None or scores.dtype is None:
                continue
            base = f"{node.name or 'Add'}/fp16_select"
            new = []
            if mask not in zero_checks:
                zero = add_initializer(graph, f"{base}/zero", np.zeros((), dtype=mask.dtype.numpy()))
                equal = ir.node("Equal", [mask, zero], name=f"{base}/visible")
                equal.outputs[0].name = equal.name
                new.append(equal)
                zero_checks[mask] = equal.outputs[0]
            fill = add_initializer(graph, f"{base}/fill", np.array(SAFE_FILL, dtype=scores.dtype.numpy()))
            select = ir.node("Where", [zero_checks[mask], scores, fill], name=base)
            new.append(select)
            graph.insert_before(node, new)
            select.outputs[0].dtype = node.outputs[0].dtype
            select.outputs[0].shape = node.outputs[0].shape
            old_name = node.outputs[0].name
            ir.convenience.replace_all_uses_with(node.outputs[0], select.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            select.outputs[0].name = old_name
            rewritten.append(node.name or old_name)
            break
    return rewritten


def _safe_select_fills(graph: ir.Graph) -> list[str]:
    changed = []
    for node in graph:
        if node.op_type != "Where" or not _feeds_softmax(node.outputs[0]):
            continue
        for index in (1, 2):
            value = node.inputs[index]
            fill = _scalar(value)
            if fill is not None and fill < SAFE_FILL and value.dtype is not None:
                array = np.full(value.shape.numpy() if value.shape is not None else (), SAFE_FILL,
                                dtype=value.dtype.numpy())
                node.replace_input_with(index, add_initializer(graph, f"{node.name or 'Where'}/fp16_fill", array))
                changed.append(node.name)
    return changed


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


def _clip(tensor: ir.TensorProtocol) -> tuple[str, ir.Tensor] | None:
    """(old peak, clipped tensor) when a float tensor has finite values beyond ±65504."""
    if not tensor.dtype.is_floating_point() or tensor.dtype == ir.DataType.FLOAT16:
        return None
    array = tensor.numpy()
    peak = _finite_peak(array)
    if peak <= FP16_MAX:
        return None
    clipped = np.where(np.isfinite(array), np.clip(array, -FP16_MAX, FP16_MAX), array).astype(array.dtype)
    return f"{peak:.4g}", ir.tensor(clipped, name=tensor.name)


def _clip_constants(graph: ir.Graph) -> dict[str, str]:
    clipped: dict[str, str] = {}
    for value in list(graph.initializers.values()):
        result = _clip(value.const_value) if value.const_value is not None else None
        if result is not None:
            clipped[value.name], value.const_value = result
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            result = _clip(node.attributes["value"].as_tensor())
            if result is not None:
                clipped[node.name], tensor = result
                node.attributes["value"] = ir.AttrTensor("value", tensor)
    return clipped


# -- rule 4: calibration -----------------------------------------------------------------------

def _calibration_feeds(model: ir.Model, options: FP16ClipOptions) -> list[dict[str, np.ndarray]]:
    from qeff.passes.verify import sample_inputs

    if options.samples:
        path = Path(options.samples)
        if not path.is_file():
            raise PassOptionError(f"fp16clip: samples file {path} does not exist", "give an .npz of inputs")
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        names = [v.name for v in model.graph.inputs]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise PassOptionError(f"fp16clip: {path.name} lacks inputs {', '.join(missing)}",
                                  "store one array per input name, first axis = sample")
        count = len(arrays[names[0]])
        return [{n: arrays[n][i] for n in names} for i in range(count)]
    return [sample_inputs(model, seed=i) for i in range(options.calibrate)]


def _calibrate(model: ir.Model, options: FP16ClipOptions) -> dict[str, float]:
    proto = ir.serde.serialize_model(model)
    floats = float32_names(proto)
    known = {o.name for o in proto.graph.output}
    names = [out for node in proto.graph.node for out in node.output if out in floats]
    for name in names:
        if name not in known:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = onnxruntime_session(proto.SerializeToString(), purpose=" for fp16clip calibration")
    maxima: dict[str, float] = collections.defaultdict(float)
    for feeds in _calibration_feeds(model, options):
        for name, array in zip(names, session.run(names, feeds)):
            if array.size:
                maxima[name] = max(maxima[name], float(np.max(np.abs(array.astype(np.float64)))))
    return {name: peak for name, peak in maxima.items() if not np.isfinite(peak) or peak * options.margin > FP16_MAX}


def _clamp(graph: ir.Graph, flagged: dict[str, float]) -> None:
    values = {out.name: out for node in graph for out in node.outputs}
    low = add_initializer(graph, "fp16clip/low", np.array(-FP16_MAX, dtype=np.float32))
    high = add_initializer(graph, "fp16clip/high", np.array(FP16_MAX, dtype=np.float32))
    for name in flagged:
        value = values.get(name)
        if value is None or value.dtype != ir.DataType.FLOAT:
            continue
        clip = ir.node("Clip", [value, low, high], name=f"{name}/fp16_clamp")
        clip.outputs[0].dtype, clip.outputs[0].shape = value.dtype, value.shape
        graph.insert_after(value.producer(), clip)
        out = clip.outputs[0]
        ir.convenience.replace_all_uses_with(value, out, replace_graph_outputs=True)
        clip.replace_input_with(0, value)
        if out in graph.outputs:  # the interface keeps the name, for the clamped value
            value.name, out.name = f"{name}__unclamped", name
        else:
            out.name = f"{name}_clamped"
