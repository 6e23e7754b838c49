"""The external-data files an ONNX file refers to, read from its protobuf alone (no weights).

Used when an output is replaced: the files the old model read are removed once the new model
is in place, and an exporter's fixed data file name is changed to one unique to the save
(:func:`qeff.common.atomic.unique_data_name`) so the old model never pairs with new data.
"""

from __future__ import annotations

__all__ = ["referenced_locations", "relink_data", "replaced_data_files"]

import os
import re
from collections.abc import Iterator
from pathlib import Path

import onnx

# Data files qeff-opt writes: ``model.onnx.data`` or ``model.onnx.<8 hex>.data``. Only these are
# ever removed on a replace; a data file with another name may be shared with other models.
_OURS = r"(\.[0-9a-f]{8})?\.data"


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def referenced_locations(model_path: str | os.PathLike) -> set[str]:
    """The ``location`` of every external tensor in the file (empty when it is unreadable)."""
    try:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception:  # an unreadable old output: nothing of it to clean up
        return set()
    return {loc for t in _all_tensors(model) if (loc := _location(t))}


def relink_data(model_path: str | os.PathLike, old: str, new: str) -> None:
    """Point every external tensor stored at ``old`` to ``new`` (the model file only)."""
    model = onnx.load(os.fspath(model_path), load_external_data=False)
    for tensor in _all_tensors(model):
        if _location(tensor) == old:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = new
    onnx.save(model, os.fspath(model_path))


def replaced_data_files(destination: str | os.PathLike, keep: set[Path] = frozenset()) -> list[Path]:
    """The data files the model now at ``destination`` reads that a replacing save makes
    obsolete: only files named as qeff-opt names them, beside it, and not in ``keep``."""
    destination = Path(destination)
    if not destination.is_file():
        return []
    parent = destination.resolve().parent
    pattern = re.compile(re.escape(destination.name) + _OURS)
    if not any(pattern.fullmatch(p.name) for p in parent.iterdir()):
        return []  # nothing of ours beside it: no need to parse the old model
    keep = {p.resolve() for p in keep}
    found = []
    for location in referenced_locations(destination):
        path = (parent / location).resolve()
        if path.parent == parent and pattern.fullmatch(path.name) and path not in keep:
            found.append(path)
    return found
