"""Reading constant values out of a graph without reading weights by accident.

A value is constant when it is an initializer or the output of a ``Constant`` node. Callers
that only want small constants (scales, shape vectors) pass ``max_elements``, which is checked
against the tensor's shape before any data is read, so a multi-gigabyte weight is never loaded
to find out it is not a scalar.
"""

from __future__ import annotations

__all__ = ["const_tensor", "const_array", "const_scalar"]

import numpy as np
import onnx_ir as ir


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``, without reading its data; None when not constant."""
    if value is None:
        return None
    return ir.convenience.get_const_tensor(value)


def const_array(value: ir.Value | None, max_elements: int | None = None) -> np.ndarray | None:
    """``value``'s constant as an array; None when it is not constant or, with
    ``max_elements``, bigger than that."""
    tensor = const_tensor(value)
    if tensor is None or (max_elements is not None and tensor.size > max_elements):
        return None
    return np.asarray(tensor.numpy())


def const_scalar(value: ir.Value | None) -> float | None:
    """A numeric one-element constant as a float; None otherwise."""
    array = const_array(value, max_elements=1)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))
