"""Loading and saving models on onnx-ir, safely and without holding the weights in memory.

Rules:
- Loading memory-maps external data (``ir.load``); weights are only read when a pass touches them.
- Every model is checked before a pass sees it (:func:`check_model`): names are text, graphs
  have outputs and no cycle, and every external-data reference of every tensor is relative,
  stays inside the model's folder, names an existing file and fits inside it.
- Saving is atomic: the model and its data file are written into a temporary folder beside the
  destination and renamed into place only once both are complete, the model's rename being the
  only commit point (the data file's name is unique to each save), so a failure or an
  interruption never leaves a partial output and an existing output stays intact.
- The input files are never written: an output path that equals the input model or any data
  file the input reads from is refused.
"""

from __future__ import annotations

__all__ = [
    "ModelLike",
    "load_model",
    "as_ir_model",
    "save_model",
    "StagedModel",
    "check_output_path",
    "check_model",
    "external_data_files",
    "model_nbytes",
]

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qeff.common.atomic import Staging, unique_data_name
from qeff.common.datafiles import replaced_data_files
from qeff.common.paths import check_output_file
from qeff.common.progress import bytes_progress
from qeff.errors import ModelLoadError, OutputPathError

logger = logging.getLogger(__name__)

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model, Any]

# Above this many bytes of initializers a model is always saved with external data: protobuf
# cannot serialise a message of 2 GiB, and a smaller inline file is still slow to parse.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file lazily and validate it (see :func:`check_model`)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not an ONNX file", "pass the .onnx file inside it")
    try:
        model = ir.load(path)
    except DecodeError as e:
        raise ModelLoadError(
            f"{path} is not a valid ONNX model (protobuf decode failed: {e})",
            "the file may be truncated or not ONNX at all; re-export it",
        ) from e
    except (OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} could not be read as ONNX: {e}", "re-export the model") from e
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(
            f"{path} parsed to an empty ONNX model",
            "the file is probably not ONNX; re-export the model",
        )
    check_model(model, path.parent, origin=path.name)
    return model


def check_model(model: ir.Model, base_dir: Path | None = None, *, origin: str = "the model") -> None:
    """Refuse what no pass can work on, before any pass runs.

    - every name is text (a name that is not UTF-8 cannot be written back);
    - the graph has outputs and no cycle, in every graph and function;
    - every external-data reference, of any tensor (initializers, ``Constant`` and other
      attribute tensors, in subgraphs and functions), is relative, stays inside the model's
      folder (``base_dir``, else the folder each tensor was loaded from) once symlinks are resolved, names an existing file and fits inside it. Attribute
      tensors are then read into memory: they are small, and an output must not depend on
      where the input's files were.
    """
    if not model.graph.outputs:
        raise ModelLoadError(f"{origin} has no graph outputs: it computes nothing a pass could keep",
                             "re-export the model with its outputs")
    _check_names(model, origin)
    for graph in _graphs(model):
        _check_acyclic(graph, origin)
    _check_external_data(model, base_dir)


def _graphs(model: ir.Model):
    yield from model.graphs()
    for function in model.functions.values():
        yield function


def _all_tensors(model: ir.Model):
    """(what, tensor, replace) for every tensor: initializers and attribute tensors, everywhere."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield f"initializer {value.name!r}", value.const_value, None
    for graph in _graphs(model):
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield f"tensor attribute {attr.name!r} of node {node.name!r}", attr.value, (node, attr.name, None)
                elif attr.type == ir.AttributeType.TENSORS:
                    for i, t in enumerate(attr.value or ()):
                        yield f"tensor {i} of attribute {attr.name!r} of node {node.name!r}", t, (node, attr.name, i)


def _check_names(model: ir.Model, origin: str) -> None:
    def text(name: object, what: str) -> None:
        if name is not None and not isinstance(name, str):
            raise ModelLoadError(f"{origin}: the {what} {name!r} is not valid UTF-8 text",
                                 "ONNX names are UTF-8; re-export the model")

    for graph in _graphs(model):
        for v in [*graph.inputs, *graph.outputs]:
            text(v.name, "graph input/output name")
        for node in graph:
            text(node.name, "node name")
            text(node.op_type, "operator type")
            text(node.domain, "operator domain")
            for v in node.outputs:
                text(v.name, "value name")
            for attr in node.attributes.values():
                text(attr.name, "attribute name")
                if attr.type == ir.AttributeType.STRING:
                    text(attr.value, f"text of attribute {attr.name!r}")
    for key, value in model.metadata_props.items():
        text(key, "metadata key")
        text(value, "metadata value")


def _check_acyclic(graph: ir.Graph | ir.Function, origin: str) -> None:
    """Depth-first search over producer edges within ``graph`` (iterative: graphs are deep)."""
    nodes = set(graph)
    state: dict[ir.Node, int] = {}  # 1: on the current path, 2: done
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(root.inputs))]
        state[root] = 1
        while stack:
            node, inputs = stack[-1]
            for value in inputs:
                producer = value.producer() if value is not None else None
                if producer is None or producer not in nodes:
                    continue
                if state.get(producer) == 1:
                    raise ModelLoadError(
                        f"{origin}: the graph has a cycle through node {producer.name!r} ({producer.op_type})",
                        "an ONNX graph must be acyclic; re-export the model")
                if producer not in state:
                    state[producer] = 1
                    stack.append((producer, iter(producer.inputs)))
                    break
            else:
                state[node] = 2
                stack.pop()


def _check_external_data(model: ir.Model, base_dir: Path | None) -> None:
    sizes: dict[Path, int] = {}
    for what, tensor, where in list(_all_tensors(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        # A model built in memory: each tensor's data is relative to the folder it came from.
        base = Path(base_dir if base_dir is not None else (tensor.base_dir or ".")).resolve()
        location = tensor.location
        if os.path.isabs(location) or Path(location).is_absolute():
            raise ModelLoadError(
                f"{what} points to external data at an absolute path ({location})",
                "external data must sit beside the model; re-save it with a relative location",
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"{what} points to external data outside the model's folder ({location})",
                "move the data file next to the model and re-save it",
            )
        if target not in sizes:
            if not target.is_file():
                raise ModelLoadError(
                    f"external data file {location!r} of {what} is missing (looked in {base})",
                    "copy the data file next to the model",
                )
            sizes[target] = target.stat().st_size
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if offset < 0 or length < 0 or offset + length > sizes[target] or length < tensor.nbytes:
            raise ModelLoadError(
                f"external data file {location!r} does not hold {what} (needs bytes {offset}–{offset + length}"
                f" of {tensor.nbytes} bytes of data, the file has {sizes[target]})",
                "the data file is truncated or does not belong to this model; copy or re-export it",
            )
        if where is not None:
            node, name, index = where
            loaded = ir.tensor(tensor.numpy(), name=tensor.name)
            attr = node.attributes[name]
            if index is None:
                node.attributes[name] = ir.AttrTensor(name, loaded)
            else:
                tensors = list(attr.value)
                tensors[index] = loaded
                node.attributes[name] = ir.AttrTensors(name, tensors)


def external_data_files(model: ir.Model) -> set[Path]:
    """The resolved data files the model's external tensors read from."""
    return {Path(t.path).resolve() for _, t, _ in _all_tensors(model) if isinstance(t, ir.ExternalTensor)}


def model_nbytes(model: ir.Model) -> int:
    """Bytes held by initializers (read from metadata; nothing is loaded)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def as_ir_model(model: ModelLike) -> ir.Model:
    """Turn any accepted model form into an ``ir.Model``.

    Accepted: a path, an ``onnx.ModelProto``, an ``ir.Model`` (returned as is) or an
    ``onnx_graphsurgeon.Graph``.
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, onnx.ModelProto):
        # The IR wraps the proto's tensors in place: a copy keeps the caller's proto untouched.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        converted = ir.serde.deserialize_model(copy)
        check_model(converted)
        return converted
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        if isinstance(model, gs.Graph):
            converted = ir.serde.deserialize_model(gs.export_onnx(model))
            check_model(converted)
            return converted
    raise TypeError(
        "expected a path, onnx.ModelProto, onnx_ir.Model or onnx_graphsurgeon.Graph, "
        f"got {type(model).__name__}"
    )


def check_output_path(output: str | os.PathLike, *, inputs: set[Path] = frozenset()) -> Path:
    """Refuse output paths that would overwrite an input file or cannot be written."""
    out = Path(output)
    if out.suffix != ".onnx":
        raise OutputPathError(f"output {out} does not end in .onnx", "name the output file *.onnx")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() in (resolved, resolved.with_name(resolved.name + ".data")):
            raise OutputPathError(
                f"output {out} would overwrite the input file {path}",
                "choose another output path with -o",
            )
    # The data file adds ".<8 hex>.data" to the name.
    return check_output_file(out, "output", reserve=len(".12345678.data"))


class StagedModel:
    """A model written into a temporary folder beside its destination, not yet visible there
    (:class:`qeff.common.atomic.Staging`).

    ``path`` is the staged model file (readable, e.g. by onnxruntime for verification; files
    written beside it, such as a manifest, can be committed with it as ``companions``);
    ``commit()`` moves the data file, the companions and then the model into place, the model's
    rename being the only commit point: the data file's name is unique to this save, and the
    data files of the model it replaces are removed afterwards. ``discard()`` removes
    everything. Used as a context manager, anything not committed is discarded.
    """

    def __init__(
        self,
        model: ir.Model,
        destination: str | os.PathLike,
        *,
        external_data: bool | None = None,
        progress: bool = False,
        protected: set[Path] = frozenset(),
        link_data: bool = False,
    ) -> None:
        self.destination = Path(destination)
        if external_data is None:
            external_data = bool(external_data_files(model)) or (
                model_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
            )
        self.external_data = external_data
        self.data_name = unique_data_name(self.destination) if external_data else None
        self.data_names: list[str] = []  # every data file the staged model reads
        self.protected = set(protected)
        self._staging = Staging(self.destination)
        self.path = self._staging.path
        try:
            if external_data:
                self.data_names = _save_external(model, self.path, self.data_name, progress, link_data)
            else:
                ir.save(model, self.path)
        except BaseException:
            self.discard()
            raise

    def commit(self, companions: Sequence[str] = ()) -> Path:
        keep = self.protected | {self.destination.with_name(n) for n in self.data_names}
        obsolete = replaced_data_files(self.destination, keep=keep)
        self._staging.commit(companions=[*self.data_names, *companions], obsolete=obsolete)
        logger.info("saved %s (external data: %s)", self.destination, ", ".join(self.data_names) or "none")
        return self.destination

    def discard(self) -> None:
        self._staging.discard()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    progress: bool = False,
) -> Path:
    """Save atomically; weights go to ``<name>.data`` beside the model when external.

    ``external_data=None`` chooses: external when the model already had external weights or
    holds more than 1 GiB of initializers.
    """
    with StagedModel(model, path, external_data=external_data, progress=progress) as staged:
        return staged.commit()


# Initializers at or below this size stay inline in the model file (as ``ir.save`` does).
INLINE_THRESHOLD_BYTES = 256
_COPY_CHUNK = 64 << 20


def _save_external(model: ir.Model, path: Path, data_name: str, progress: bool, link_data: bool = False) -> list[str]:
    """Write weights to ``data_name`` beside ``path`` and the graph to ``path``; returns the
    names of the data files the saved model reads.

    Weights that still live in an input data file are copied range by range inside the kernel
    (``os.copy_file_range``), as a plain file copy would, so they never pass through Python
    memory; weights a pass rewrote are written one tensor at a time (a lazy one, such as an MX
    weight, chunk by chunk). With ``link_data`` an input data file is instead hard-linked beside
    the output under a name of this save, and the weights it holds are referenced there, not
    copied (on another file system, where no link can be made, they are copied). The model's
    own tensors are swapped for references into the new files only while the graph is
    serialised.
    """
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    external = [v for v in values if v.const_value.nbytes > INLINE_THRESHOLD_BYTES]
    originals = {v: v.const_value for v in values}
    for value in values:
        # A small weight that lives in some data file goes inline, as it would from memory.
        if value.const_value.nbytes <= INLINE_THRESHOLD_BYTES and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    sources: dict[str, int] = {}
    names: list[str] = []
    try:
        if link_data:
            linked = _link_sources(external, path, names)
            external = [v for v in external if v not in linked]
        total = sum(v.const_value.nbytes for v in external)
        with bytes_progress(total, "writing weights", progress) as advance, open(path.parent / data_name, "wb") as out:
            offset = 0
            for value in external:
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    _copy_range(tensor, out, sources)
                elif isinstance(tensor, ir.LazyTensor):
                    tensor.tofile(out)  # a streamed tensor writes itself chunk by chunk
                else:
                    out.write(tensor.tobytes())
                length = tensor.nbytes
                value.const_value = ir.ExternalTensor(
                    data_name, offset, length, tensor.dtype,
                    shape=tensor.shape, name=value.name, base_dir=path.parent,
                )
                offset += length
                advance(length)
        if external:
            names.append(data_name)
        else:
            (path.parent / data_name).unlink()
        ir.save(model, path)
    finally:
        for value, tensor in originals.items():
            value.const_value = tensor
        for fd in sources.values():
            os.close(fd)
    return names


def _link_sources(external: list[ir.Value], path: Path, names: list[str]) -> set[ir.Value]:
    """Hard-link each input data file that unchanged weights live in beside ``path`` and point
    those weights at the link; returns the values now referenced there."""
    links: dict[Path, str | None] = {}
    done: set[ir.Value] = set()
    for value in external:
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        source = Path(tensor.path).resolve()
        if source not in links:
            name = unique_data_name(path)
            try:
                os.link(source, path.parent / name)
            except OSError as e:  # another file system, or links not allowed: copy instead
                logger.info("cannot link %s beside the output (%s); copying its weights", source, e)
                links[source] = None
            else:
                links[source] = name
                names.append(name)
        if links[source] is not None:
            value.const_value = ir.ExternalTensor(
                links[source], tensor.offset, tensor.length, tensor.dtype,
                shape=tensor.shape, name=value.name, base_dir=path.parent,
            )
            done.add(value)
    return done


def _copy_range(tensor: ir.ExternalTensor, out: Any, sources: dict[str, int]) -> None:
    src_path = str(tensor.path)
    if src_path not in sources:
        sources[src_path] = os.open(src_path, os.O_RDONLY)
    src = sources[src_path]
    position = tensor.offset or 0
    remaining = tensor.nbytes
    out.flush()
    dst = out.fileno()
    while remaining:
        try:
            copied = os.copy_file_range(src, dst, min(remaining, 1 << 30), position)
        except OSError:
            copied = 0  # e.g. across file systems on old kernels: fall back to read/write
        if copied == 0:
            chunk = os.pread(src, min(remaining, _COPY_CHUNK), position)
            if not chunk:
                raise ModelLoadError(
                    f"external data of {tensor.name!r} ends early in {src_path}",
                    "the data file is truncated; re-export the model",
                )
            copied = os.write(dst, chunk)
        position += copied
        remaining -= copied
