"""What the Cloud AI compiler is known to need inside functions.

Rules:

1. The ``axes`` input of a reduction and the ``shape`` input of ``Expand`` are not formal
   inputs of a function where a call passes a constant: the constant belongs in the body.
2. A ``Gather`` index known as a constant (in the body, or passed by every call) lies within
   the gathered dim, where that dim is known.
"""

from __future__ import annotations

__all__ = ["function_problems", "calls_of"]

import numpy as np
import onnx_ir as ir

from qeff.passes.ir.constants import const_array, const_tensor

# ops whose input at this position must be a constant inside a function
_CONSTANT_INPUTS = {"Expand": 1, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "ReduceMin": 1,
                    "ReduceProd": 1, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1,
                    "ReduceSumSquare": 1}


def calls_of(graph: ir.Graph, function: ir.Function) -> list[ir.Node]:
    return [n for n in graph if n.domain == function.domain and n.op_type == function.name
            and n.overload == function.overload]


def _gather_problem(node: ir.Node, indices: np.ndarray) -> str | None:
    data = node.inputs[0]
    axis = node.attributes.get_int("axis", 0)
    if data is None or data.shape is None or not -len(data.shape) <= axis < len(data.shape):
        return None
    dim = data.shape[axis]
    if not isinstance(dim, int):
        return None
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        return f"Gather {node.name!r} reads index {int(indices.max() if indices.max() >= dim else indices.min())} " \
               f"of a dim of size {dim}"
    return None


def function_problems(model: ir.Model, domain: str) -> list[str]:
    """Each way a function of ``domain`` breaks a rule above, as one line."""
    problems = []
    for function in model.functions.values():
        if function.domain != domain:
            continue
        formal = {id(v): i for i, v in enumerate(function.inputs)}
        calls = calls_of(model.graph, function)
        for node in function:
            slot = _CONSTANT_INPUTS.get(node.op_type)
            if slot is not None and len(node.inputs) > slot and id(node.inputs[slot]) in formal:
                index = formal[id(node.inputs[slot])]
                if any(const_tensor(call.inputs[index]) is not None for call in calls):
                    problems.append(f"{function.name}: {node.op_type} {node.name!r} reads a constant "
                                    f"{'shape' if node.op_type == 'Expand' else 'axes'} through a function input")
            if node.op_type == "Gather" and len(node.inputs) > 1:
                indices = node.inputs[1]
                arrays = [const_array(indices)] if id(indices) not in formal else \
                    [const_array(call.inputs[formal[id(indices)]]) for call in calls]
                for array in arrays:
                    problem = _gather_problem(node, array) if array is not None else None
                    if problem:
                        problems.append(f"{function.name}: {problem}")
                        break
    return problems
