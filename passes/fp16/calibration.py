"""Calibration for fp16clip: find the activations that leave fp16 range and deal with them.

The fp32 model runs in onnxruntime on sample inputs with every float value made an output, and
each value's largest magnitude is recorded. A value whose peak × margin exceeds 65504 is
*flagged*. Three remedies, in this order:

1. The square inside an RMSNorm (``Pow(x, 2)`` or ``Mul(x, x)`` → ReduceMean → Add(eps) → Sqrt →
   Reciprocal/Div → Mul(x, ·)) is rescaled: ``x`` is multiplied by 2^−k before the square and
   the final product, and eps by 2^−2k. The norm's result is unchanged (a power of two scales
   exactly), and its square stays in fp16 range.
2. ``clamp``: a ``Clip(±65504)`` after each remaining flagged value.
3. ``fp32``: the remaining flagged values are listed for the compiler's ``-node-precision-info``
   YAML (``FP32NodeInstanceNames``), which computes them in fp32 on the card.
"""

from __future__ import annotations

__all__ = ["calibration_feeds", "activation_peaks", "rescale_norms", "clamp"]

import collections
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qeff.errors import PassOptionError
from qeff.passes.fp16.masks import FP16_MAX, SAFE_FILL
from qeff.passes.fp16.simulation import expose_float32_values
from qeff.passes.ir.builder import add_initializer, reroute_uses
from qeff.common.onnxrt import onnxruntime_session

logger = logging.getLogger(__name__)

# Rescaled squares keep this factor of headroom below 65504 for inputs larger than the samples.
_HEADROOM = 4.0


def calibration_feeds(model: ir.Model, count: int, samples: str | None) -> list[dict[str, np.ndarray]]:
    """The inputs to calibrate on: the arrays of ``samples`` (.npz, first axis = sample) or
    ``count`` generated ones."""
    from qeff.passes.ir.sample_inputs import sample_inputs

    if not samples:
        return [sample_inputs(model, seed=i) for i in range(count)]
    path = Path(samples)
    if not path.is_file():
        raise PassOptionError(f"fp16clip: samples file {path} does not exist", "give an .npz of inputs")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    names = [v.name for v in model.graph.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise PassOptionError(f"fp16clip: {path.name} lacks inputs {', '.join(missing)}",
                              "store one array per input name, first axis = sample")
    lengths = {len(arrays[n]) for n in names}
    if len(lengths) != 1:
        raise PassOptionError(f"fp16clip: the arrays in {path.name} hold different numbers of samples",
                              "give every input the same first dimension")
    return [{n: arrays[n][i] for n in names} for i in range(lengths.pop())]


def _masked_sums(graph: ir.Graph) -> set[str]:
    """Scores plus mask that only a mask select reads: their out-of-range elements are exactly
    the masked ones, which the select replaces, so they are not overflows."""
    names = set()
    for node in graph:
        for out in node.outputs:
            uses = list(out.uses())
            if uses and all(u.node.op_type == "Where" and u.idx == 2 and _uniform(u.node.inputs[1]) == SAFE_FILL
                            for u in uses):
                names.add(out.name)
    return names


def activation_peaks(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The largest |value| of every float32 node output over ``feeds``, in fp32 onnxruntime
    (sums of scores and a mask that a select then masks are left out)."""
    proto = ir.serde.serialize_model(model)
    names = expose_float32_values(proto, skip=_masked_sums(model.graph))
    session = onnxruntime_session(proto.SerializeToString(), optimize=False, purpose=" for fp16clip calibration")
    peaks: dict[str, float] = collections.defaultdict(float)
    for feed in feeds:
        for name, array in zip(names, session.run(names, dict(feed))):
            if array.size:
                peaks[name] = max(peaks[name], float(np.max(np.abs(array.astype(np.float64)))))
    return dict(peaks)


# -- remedy 1: RMSNorm squares -----------------------------------------------------------------

def _only_user(value: ir.Value, *op_types: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type in op_types:
        return uses[0].node
    return None


def _uniform(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size > 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _match_rms_norm(square: ir.Node) -> dict[str, ir.Node | ir.Value] | None:
    """The nodes of an RMSNorm whose square is ``square``, or None (with the reason logged)."""

    def fail(why: str) -> None:
        logger.info("fp16clip: %s is not an RMSNorm square: %s", square.name, why)

    if square.op_type == "Pow" and _uniform(square.inputs[1]) == 2.0:
        x = square.inputs[0]
    elif square.op_type == "Mul" and square.inputs[0] is square.inputs[1]:
        x = square.inputs[0]
    else:
        return fail("not Pow(x, 2) or Mul(x, x)")
    mean = _only_user(square.outputs[0], "ReduceMean")
    if mean is None:
        return fail("its only user is not a ReduceMean")
    shift = _only_user(mean.outputs[0], "Add")
    eps_index = next((i for i, v in enumerate(shift.inputs) if v is not mean.outputs[0]), None) if shift else None
    if shift is None or eps_index is None or _uniform(shift.inputs[eps_index]) is None:
        return fail("the mean is not followed by Add(eps) with a constant eps")
    root = _only_user(shift.outputs[0], "Sqrt")
    if root is None:
        return fail("no Sqrt after the eps")
    after = _only_user(root.outputs[0], "Reciprocal", "Div")
    if after is None:
        return fail("no Reciprocal or Div after the Sqrt")
    if after.op_type == "Div" and after.inputs[0] is x:  # x / sqrt(...)
        return {"x": x, "square": square, "shift": shift, "eps_index": eps_index, "apply": after}
    if after.op_type == "Div" and _uniform(after.inputs[0]) != 1.0:
        return fail("the Div after the Sqrt is neither 1/· nor x/·")
    product = next((u.node for u in after.outputs[0].uses() if u.node.op_type == "Mul" and x in u.node.inputs), None)
    if product is None or len(list(after.outputs[0].uses())) != 1:
        return fail("the inverse root is not only multiplied by x")
    return {"x": x, "square": square, "shift": shift, "eps_index": eps_index, "apply": product}


def rescale_norms(graph: ir.Graph, flagged: dict[str, float], margin: float) -> dict[str, int]:
    """Rescale every flagged RMSNorm square; returns {square name: k} and unflags what it fixed."""
    producers = {out.name: node for node in graph for out in node.outputs}
    rescaled: dict[str, int] = {}
    for name, peak in list(flagged.items()):
        square = producers.get(name)
        match = _match_rms_norm(square) if square is not None and math.isfinite(peak) else None
        if match is None:
            continue
        k = max(1, math.ceil(0.5 * math.log2(peak * margin * _HEADROOM / FP16_MAX)))
        x, shift, eps_index = match["x"], match["shift"], match["eps_index"]
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        factor = add_initializer(graph, f"{name}/fp16_rescale/factor", np.array(2.0 ** -k, dtype=dtype))
        scale = ir.node("Mul", [x, factor], name=f"{name}/fp16_rescale")
        scale.outputs[0].name, scale.outputs[0].dtype, scale.outputs[0].shape = scale.name, x.dtype, x.shape
        graph.insert_before(square, scale)
        for node in (square, match["apply"]):
            for i, v in enumerate(node.inputs):
                if v is x:
                    node.replace_input_with(i, scale.outputs[0])
        eps = _uniform(shift.inputs[eps_index]) * 2.0 ** (-2 * k)
        shift.replace_input_with(eps_index, add_initializer(graph, f"{name}/fp16_rescale/eps", np.array(eps, dtype=dtype)))
        mean = _only_user(square.outputs[0], "ReduceMean")
        for value in (square.outputs[0], mean.outputs[0], shift.outputs[0]):
            flagged.pop(value.name, None)
        rescaled[name] = k
    return rescaled


# -- remedy 2: clamps --------------------------------------------------------------------------

def clamp(graph: ir.Graph, names: Sequence[str]) -> list[str]:
    """Insert ``Clip(±65504)`` after each named float32 value; returns the names clamped."""
    values = {out.name: out for node in graph for out in node.outputs}
    targets = [values[n] for n in names if n in values and values[n].dtype == ir.DataType.FLOAT]
    if not targets:
        return []
    names = [v.name for v in targets]
    low = add_initializer(graph, "fp16clip/low", np.array(-FP16_MAX, dtype=np.float32))
    high = add_initializer(graph, "fp16clip/high", np.array(FP16_MAX, dtype=np.float32))
    for value in targets:
        name = value.name
        clip = ir.node("Clip", [value, low, high], name=f"{name}/fp16_clamp")
        clip.outputs[0].dtype, clip.outputs[0].shape = value.dtype, value.shape
        graph.insert_after(value.producer(), clip)
        out = clip.outputs[0]
        reroute_uses(value, out, clip, 0)
        if out in graph.outputs:  # the interface keeps the name, for the clamped value
            value.name, out.name = f"{name}__unclamped", name
        else:
            out.name = f"{name}_clamped"
    return names
