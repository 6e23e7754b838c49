"""fp16-safe attention masks: additive masks become selects, select fills become −65504.

A plain export masks attention scores by adding a mask that holds 0 where a key is visible and
a sentinel (float32 min or −inf) where it is not. In fp16 the float32 min is −inf; a row whose
keys are all masked (a padded query) is then −inf everywhere and Softmax gives NaN, and even a
sentinel clipped to −65504 overflows to −inf once added to a negative score. The rewrite keeps
the sum for visible keys and replaces masked ones by −65504 with a ``Where``, so no sentinel
reaches the Softmax: a fully masked row gets a uniform softmax (finite, and ignored later), every
other row is unchanged. Each rule is pattern (``Add``/``Where`` feeding a Softmax), check (one
operand derives from a sentinel constant and not from a matrix product) and rewrite.
"""

from __future__ import annotations

__all__ = ["FP16_MAX", "SAFE_FILL", "MASKED_BELOW", "rewrite_additive_masks", "safe_select_fills"]

import logging

import numpy as np
import onnx_ir as ir

from qeff.passes.ir.builder import add_initializer, reroute_uses
from qeff.passes.ir.traversal import ancestor_nodes

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
# The fill of a masked score: the most negative fp16 number. Nothing is added to it after the
# select, so it cannot overflow.
SAFE_FILL = -FP16_MAX
# A mask element below this hides its score. Sentinels are ≤ −65504 (also after clipping, and
# with a bias such as ALiBi added to them); real biases stay far above half the fp16 range.
MASKED_BELOW = -FP16_MAX / 2
# Ops between a mask (or the scores) and the Softmax that do not change values.
_TRANSPARENT = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Expand", "Slice"}
# A value computed by one of these is a score, never a mask.
_PRODUCTS = {"MatMul", "Gemm", "Einsum", "Attention", "Conv", "MatMulInteger", "QLinearMatMul"}
_SEARCH_LIMIT = 512  # producers visited when tracing a mask back to its sentinel


def _feeds_softmax(value: ir.Value) -> bool:
    for use in value.uses():
        node = use.node
        if node.op_type == "Softmax":
            return True
        if node.op_type in _TRANSPARENT and use.idx == 0 and _feeds_softmax(node.outputs[0]):
            return True
    return False


def _uniform_constant(value: ir.Value | None) -> float | None:
    """The value of a float constant whose elements are all equal, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size > 4096 or not tensor.dtype.is_floating_point():
        return None
    array = tensor.numpy().astype(np.float64).reshape(-1)
    if array.size == 0 or not np.all(array == array[0]):
        return None
    return float(array[0])


def _is_sentinel(x: float | None) -> bool:
    return x is not None and x <= -FP16_MAX


def _holds_sentinel(node: ir.Node) -> bool:
    if node.op_type == "ConstantOfShape" and "value" in node.attributes:
        values = node.attributes["value"].as_tensor().numpy().reshape(-1)
        return values.size == 1 and bool(values[0] <= -FP16_MAX)
    return any(_is_sentinel(_uniform_constant(v)) for v in node.inputs)


def is_additive_mask(value: ir.Value) -> bool:
    """Whether ``value`` derives from a sentinel constant (≤ −65504) and from no matrix product."""
    if _is_sentinel(_uniform_constant(value)):
        return True
    found = False
    # Shape edges carry no values: a mask expanded to Shape(scores) does not derive from them.
    for count, node in enumerate(ancestor_nodes(value)):
        if node.op_type in _PRODUCTS or count >= _SEARCH_LIMIT:
            return False
        found = found or _holds_sentinel(node)
    return found


def _float_dtype(*values: ir.Value) -> np.dtype:
    for v in values:
        if v.dtype is not None and v.dtype.is_floating_point():
            return v.dtype.numpy()
    return np.dtype(np.float32)


def rewrite_additive_masks(graph: ir.Graph) -> list[str]:
    """``Add(scores, mask)`` before a Softmax → ``Where(mask < −32752, −65504, Add(scores, mask))``.

    The Add stays, so visible scores are bit-identical; one ``Less`` per distinct mask value is
    shared by every layer that adds it.
    """
    rewritten = []
    hidden: dict[ir.Value, ir.Value] = {}
    for node in list(graph):
        if node.op_type != "Add" or len(node.inputs) != 2 or not _feeds_softmax(node.outputs[0]):
            continue
        a, b = node.inputs
        if a is None or b is None:
            continue
        masks = [v for v in (b, a) if is_additive_mask(v)]
        if len(masks) != 1:
            if len(masks) == 2:
                logger.info("fp16clip: %s adds two sentinel-derived values; left alone", node.name)
            continue
        mask = masks[0]
        out = node.outputs[0]
        dtype = _float_dtype(out, a, b)
        base = f"{node.name or out.name}/fp16_select"
        new = []
        if mask not in hidden:
            threshold = add_initializer(graph, f"{base}/masked_below", np.array(MASKED_BELOW, dtype=_float_dtype(mask)))
            less = ir.node("Less", [mask, threshold], name=f"{base}/hidden")
            less.outputs[0].name = less.name
            new.append(less)
            hidden[mask] = less.outputs[0]
        fill = add_initializer(graph, f"{base}/fill", np.array(SAFE_FILL, dtype=dtype))
        select = ir.node("Where", [hidden[mask], fill, out], name=base)
        new.append(select)
        graph.insert_after(node, new)
        select.outputs[0].dtype, select.outputs[0].shape = out.dtype, out.shape
        name = out.name
        reroute_uses(out, select.outputs[0], select, 2)
        out.name, select.outputs[0].name = f"{name}/unmasked", name
        rewritten.append(node.name or name)
    return rewritten


def safe_select_fills(graph: ir.Graph) -> list[str]:
    """``Where(c, scores, sentinel)`` before a Softmax gets −65504 as its fill."""
    changed = []
    for node in graph:
        if node.op_type != "Where" or not _feeds_softmax(node.outputs[0]):
            continue
        for index in (1, 2):
            value = node.inputs[index]
            fill = _uniform_constant(value)
            if fill is not None and fill < SAFE_FILL:
                tensor = ir.convenience.get_const_tensor(value)
                array = np.full(tensor.shape.numpy(), SAFE_FILL, dtype=tensor.dtype.numpy())
                node.replace_input_with(index, add_initializer(graph, f"{node.name or 'Where'}/fp16_fill", array))
                changed.append(node.name)
    return changed
