"""fp16 simulation in onnxruntime: what a model computes on a card that stores every tensor in fp16.

The Cloud AI compiler converts a float32 model to fp16 (``-convert-to-fp16``). onnxruntime's CPU
provider has few fp16 kernels, so the simulation keeps float32 kernels and rounds every float
tensor to fp16 where it is stored: each float initializer and constant, each float graph input,
and each float node output goes through ``Cast(float16) → Cast(float)``. Rounding, overflow to
±Inf and the resulting NaN therefore appear exactly where fp16 storage puts them, while each
op's internal arithmetic stays float32 (the card, too, accumulates matrix products wider than
fp16). The model's I/O types are unchanged, so the same feeds run both versions.

Values named in ``keep_fp32`` are not rounded: that is how the compiler's
``-node-precision-info`` (``FP32NodeInstanceNames``) list is simulated.
"""

from __future__ import annotations

__all__ = ["simulate_fp16", "simulation_beside", "fp16_session", "run_fp16", "float32_names",
           "expose_float32_values"]

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from qeff.common.onnxrt import onnxruntime_session

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort  # imported by onnxruntime_session when a session is made

_FLOAT = onnx.TensorProto.FLOAT
_FLOAT16 = onnx.TensorProto.FLOAT16


def simulate_fp16(model: ir.Model | onnx.ModelProto | str | os.PathLike,
                  keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose float32 tensors are rounded to fp16 wherever they are stored.

    From a path, weights in external data are not read: the copy refers to the same data files,
    relative to the model's folder, so save it in that folder (the rounding happens in the
    graph, at run time; the copy costs the graph, not the weights)."""
    if isinstance(model, ir.Model):
        proto = ir.serde.serialize_model(model)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto.FromString(model.SerializeToString())
    else:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    graph = proto.graph
    floats = float32_names(proto)
    outputs = {o.name for o in graph.output}
    skip = set(keep_fp32) | {""}
    sources = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    heads = list(dict.fromkeys(n for n in sources if n in floats and n not in skip and n not in outputs))

    def rounded(name: str) -> str:
        # A graph output keeps its name for the rounded value; its producer writes name__fp32.
        return name if name in outputs else f"{name}__fp16"

    def raw(name: str) -> str:
        return f"{name}__fp32" if name in outputs else name

    targets = set(heads) | {out for node in graph.node for out in node.output
                            if out in floats and out not in skip}
    nodes: list[onnx.NodeProto] = []
    for name in heads:
        nodes.extend(_cast_pair(name, rounded(name)))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in targets:
                node.input[i] = rounded(name)
        produced = list(node.output)
        for i, name in enumerate(produced):
            if name in targets:
                node.output[i] = raw(name)
        nodes.append(node)
        for name in produced:
            if name in targets:
                nodes.extend(_cast_pair(raw(name), rounded(name)))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return proto


@contextlib.contextmanager
def simulation_beside(model: str | os.PathLike, keep_fp32: Iterable[str] = ()) -> Iterator[Path]:
    """The fp16 simulation of a model file, saved beside it under a hidden temporary name and
    removed on exit. Beside it, because the copy reads the model's external data by a path
    relative to its own folder (onnxruntime refuses such paths in a model given as bytes)."""
    model = Path(model)
    proto = simulate_fp16(model, keep_fp32)
    fd, name = tempfile.mkstemp(prefix=f".{model.stem}.", suffix=".fp16-sim.onnx", dir=model.parent)
    os.close(fd)
    try:
        onnx.save(proto, name)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def float32_names(proto: onnx.ModelProto) -> set[str]:
    """Names of every float32 value of the main graph (types from onnx shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    names = {vi.name for vi in (*inferred.value_info, *inferred.input, *inferred.output)
             if vi.type.tensor_type.elem_type == _FLOAT}
    return names | {t.name for t in proto.graph.initializer if t.data_type == _FLOAT}


def expose_float32_values(proto: onnx.ModelProto, skip: Iterable[str] = ()) -> list[str]:
    """Make every float32 node output of ``proto`` a graph output (in place, for inspection);
    returns their names in graph order."""
    floats = float32_names(proto) - set(skip)
    known = {o.name for o in proto.graph.output}
    names = [out for node in proto.graph.node for out in node.output if out in floats]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    return names


def _cast_pair(source: str, target: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    half = f"{target}__half"
    return (onnx.helper.make_node("Cast", [source], [half], to=_FLOAT16, name=f"{target}__to_fp16"),
            onnx.helper.make_node("Cast", [half], [target], to=_FLOAT, name=f"{target}__from_fp16"))


def fp16_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, keep_fp32: Iterable[str] = ()) -> ort.InferenceSession:
    """An onnxruntime CPU session of the fp16 simulation (graph optimisations off, so no
    optimisation can remove a rounding cast pair)."""
    return onnxruntime_session(simulate_fp16(model, keep_fp32).SerializeToString(), optimize=False,
                               purpose=" in fp16 simulation")


def run_fp16(model: ir.Model | onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
             keep_fp32: Iterable[str] = ()) -> dict[str, np.ndarray]:
    session = fp16_session(model, keep_fp32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))
