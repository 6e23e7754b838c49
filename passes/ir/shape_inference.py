"""ONNX shape inference on a weight-free copy of a model.

``onnx.shape_inference`` takes a protobuf, and serialising a model with its weights would hold
the whole model in memory (and fail past 2 GiB). So the graph is serialised with every
initializer above a small size turned into a plain input of the same type and shape, as
onnx-ir's own C-API helpers do: shape constants (Reshape targets, axes) stay values, weights
stay shapes. The model is restored before this returns, whatever happens.
"""

from __future__ import annotations

__all__ = ["infer_shapes_weight_free", "WEIGHT_FREE_LIMIT_BYTES"]

import onnx
import onnx_ir as ir

# Initializers up to this size keep their values (shape arithmetic needs them); larger ones
# are passed by type and shape only.
WEIGHT_FREE_LIMIT_BYTES = 1024


def weight_free_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` serialised with only its small initializers (see the module docstring)."""
    graph = model.graph
    order = list(graph.initializers.values())
    big = [v for v in order if v.const_value is not None and v.const_value.nbytes > WEIGHT_FREE_LIMIT_BYTES]
    tensors = {v: v.const_value for v in big}
    was_input = {v: v in graph.inputs for v in big}
    try:
        for value in big:
            if value.shape is None:
                value.shape = value.const_value.shape
            if value.dtype is None:
                value.dtype = value.const_value.dtype
            graph.initializers.pop(value.name)
            value.const_value = None
            if not was_input[value]:
                graph.inputs.append(value)
        return ir.serde.serialize_model(model)
    finally:
        for value in big:
            if not was_input[value]:
                graph.inputs.remove(value)
            value.const_value = tensors[value]
        graph.initializers.clear()  # back in their original order
        for value in order:
            graph.register_initializer(value)


def infer_shapes_weight_free(model: ir.Model, *, data_prop: bool = True) -> ir.Model:
    """A weight-free copy of ``model`` with the types and shapes ONNX inference gives every
    value (its large initializers are inputs there, carrying only their type and shape)."""
    proto = onnx.shape_inference.infer_shapes(weight_free_proto(model), data_prop=data_prop)
    return ir.serde.deserialize_model(proto)
