"""Loading and saving models on onnx-ir, safely and without holding the weights in memory.

Rules:
- Loading memory-maps external data (``ir.load``); weights are only read when a pass touches them.
- Every external-data reference is checked on load: its location must be relative, stay inside
  the model's folder, name an existing file, and fit inside it (offset + length).
- Saving is atomic: the model and its data file are written into a temporary folder beside the
  destination and renamed into place only once both are complete, so a failure never leaves a
  partial output and an existing output stays intact.
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
    "external_data_files",
    "model_nbytes",
]

import logging
import os
from pathlib import Path
from typing import Any, Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qeff.common.atomic import Staging
from qeff.common.progress import bytes_progress
from qeff.errors import ModelLoadError, OutputPathError

logger = logging.getLogger(__name__)

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model, Any]

# Above this many bytes of initializers a model is always saved with external data: protobuf
# cannot serialise a message of 2 GiB, and a smaller inline file is still slow to parse.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file lazily and validate its external-data references."""
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
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path} could not be read as ONNX: {e}", "re-export the model") from e
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(
            f"{path} parsed to an empty ONNX model",
            "the file is probably not ONNX; re-export the model",
        )
    _check_external_data(model, path.parent)
    return model


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = tensor.location
            if os.path.isabs(location) or Path(location).is_absolute():
                raise ModelLoadError(
                    f"initializer {value.name!r} points to external data at an absolute path "
                    f"({location})",
                    "external data must sit beside the model; re-save it with a relative location",
                )
            target = (base / location).resolve()
            if base != target and base not in target.parents:
                raise ModelLoadError(
                    f"initializer {value.name!r} points to external data outside the model's "
                    f"folder ({location})",
                    "move the data file next to the model and re-save it",
                )
            if target not in sizes:
                if not target.is_file():
                    raise ModelLoadError(
                        f"external data file {location!r} of initializer {value.name!r} is missing "
                        f"(looked in {base})",
                        "copy the data file next to the model",
                    )
                sizes[target] = target.stat().st_size
            end = tensor.offset or 0
            end += tensor.length if tensor.length is not None else tensor.nbytes
            if end > sizes[target]:
                raise ModelLoadError(
                    f"external data file {location!r} is too short for initializer "
                    f"{value.name!r} (needs {end} bytes, has {sizes[target]})",
                    "the data file is truncated; copy or re-export it",
                )


def external_data_files(model: ir.Model) -> set[Path]:
    """The resolved data files the model's external tensors read from."""
    files: set[Path] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return files


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
        return ir.serde.deserialize_model(model)
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        if isinstance(model, gs.Graph):
            return ir.serde.deserialize_model(gs.export_onnx(model))
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
    data = resolved.with_name(resolved.name + ".data")
    for path in inputs:
        if path.resolve() in (resolved, data):
            raise OutputPathError(
                f"output {out} would overwrite the input file {path}",
                "choose another output path with -o",
            )
    if out.is_dir():
        raise OutputPathError(f"output {out} is a folder", "give a file name ending in .onnx")
    parent = resolved.parent
    if not parent.exists():
        raise OutputPathError(f"output folder {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output folder {parent} is not writable", "choose another -o path")
    return out


class StagedModel:
    """A model written into a temporary folder beside its destination, not yet visible there
    (:class:`qeff.common.atomic.Staging`).

    ``path`` is the staged model file (readable, e.g. by onnxruntime for verification);
    ``commit()`` renames the data file and then the model into place; ``discard()`` removes
    everything. Used as a context manager, anything not committed is discarded.
    """

    def __init__(
        self,
        model: ir.Model,
        destination: str | os.PathLike,
        *,
        external_data: bool | None = None,
        progress: bool = False,
    ) -> None:
        self.destination = Path(destination)
        if external_data is None:
            external_data = bool(external_data_files(model)) or (
                model_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
            )
        self.external_data = external_data
        self.data_name = self.destination.name + ".data"
        self._staging = Staging(self.destination)
        self.path = self._staging.path
        try:
            if external_data:
                _save_external(model, self.path, self.data_name, progress)
            else:
                ir.save(model, self.path)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> Path:
        # Without a staged data file a stale one at the destination is removed: it would
        # mislead readers.
        self._staging.commit(companions=[self.data_name])
        logger.info("saved %s (external data: %s)", self.destination, self.external_data)
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


def _save_external(model: ir.Model, path: Path, data_name: str, progress: bool) -> None:
    """Write weights to ``data_name`` beside ``path`` and the graph to ``path``.

    Weights that still live in an input data file are copied range by range inside the kernel
    (``os.copy_file_range``), as a plain file copy would, so they never pass through Python
    memory; weights a pass rewrote are written one tensor at a time (a lazy one, such as an MX
    weight, chunk by chunk). The model's own tensors
    are swapped for references into the new file only while the graph is serialised.
    """
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    external = [v for v in values if v.const_value.nbytes > INLINE_THRESHOLD_BYTES]
    total = sum(v.const_value.nbytes for v in external)
    originals = {v: v.const_value for v in values}
    for value in values:
        # A small weight that lives in some data file goes inline, as it would from memory.
        if value.const_value.nbytes <= INLINE_THRESHOLD_BYTES and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    sources: dict[str, int] = {}
    try:
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
        ir.save(model, path)
    finally:
        for value, tensor in originals.items():
            value.const_value = tensor
        for fd in sources.values():
            os.close(fd)


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
