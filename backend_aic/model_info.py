"""What the compiler needs to know about a rewritten model: its KV I/O, symbols and manifest."""

from __future__ import annotations

__all__ = ["ModelInfo", "read_model_info", "file_beside_model", "read_file_beside_model"]

import dataclasses
import os
import stat
from pathlib import Path

import onnx_ir as ir

from qeff.contract import (
    BATCH_INDEX,
    Manifest,
    cache_inputs_in_layer_order,
    manifest_path,
    read_manifest,
    retained_name,
)
from qeff.errors import QeffError


@dataclasses.dataclass
class ModelInfo:
    path: Path
    manifest: Manifest
    kv_inputs: list[str]  # the cache inputs in layer order
    retained_outputs: list[str]  # the matching retained-state outputs
    input_dims: dict[str, list[int | str | None]]
    continuous_batching: bool
    output_names: list[str] = dataclasses.field(default_factory=list)

    @property
    def has_kv(self) -> bool:
        return bool(self.kv_inputs)

    def cache_length(self) -> int | str | None:
        """The cache length dim of the KV inputs: a number when fixed, else its symbol."""
        dims = self.input_dims.get(self.kv_inputs[0]) if self.kv_inputs else None
        return dims[2] if dims and len(dims) == 4 else None

    def symbols(self) -> set[str]:
        return {d for dims in self.input_dims.values() for d in dims if isinstance(d, str)}


def read_model_info(model: str | os.PathLike) -> ModelInfo:
    """Read the graph's interface (no weight is read) and the manifest beside it, if any."""
    path = Path(model)
    if not path.is_file():
        raise QeffError(f"model {path} does not exist", "give the .onnx that qeff-opt wrote")
    try:
        manifest = read_manifest(path) or Manifest()
    except ValueError as e:
        raise QeffError(f"the manifest beside {path.name} is not valid: {e}",
                        "re-run qeff-opt to write it again, or delete it") from None
    try:
        graph = ir.load(path).graph
    except Exception as e:  # onnx/protobuf raise many types for a broken file
        raise QeffError(f"cannot read {path.name} as ONNX: {e}", "give the .onnx that qeff-opt wrote") from None
    dims = {v.name: [d if isinstance(d, int) else (d.value if d is not None else None) for d in v.shape]
            if v.shape is not None else [] for v in graph.inputs}
    past = cache_inputs_in_layer_order(v.name for v in graph.inputs)
    outputs = {v.name for v in graph.outputs}
    retained = [retained_name(name) for name in past if retained_name(name) in outputs]
    return ModelInfo(path=path, manifest=manifest, kv_inputs=past, retained_outputs=retained, input_dims=dims,
                     continuous_batching=BATCH_INDEX in dims, output_names=[v.name for v in graph.outputs])


def _refuse(model: Path, field: str, value: object, why: str) -> QeffError:
    return QeffError(f"the manifest {manifest_path(model).name} field {field} names {value!r}, {why}",
                     f"a manifest names files that lie beside the model in {model.parent}; re-run the pass "
                     f"that wrote it, or remove {field} from the manifest")


def file_beside_model(model: Path, field: str, value: object) -> Path:
    """The file that manifest field ``field`` names, as a resolved path in the model's folder.

    Only a plain file name is taken, and what it leads to (links followed) must be a regular file
    inside the model's folder: a manifest that came with a downloaded model must not be able to
    have the compile copy, say, ``/etc/shadow`` or ``~/.ssh/id_rsa`` into the compile folder."""
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(value, str) or not value or value in (".", "..") or "\0" in value \
            or any(sep in value for sep in separators):
        raise _refuse(model, field, value, "which is not the plain name of a file beside the model")
    try:
        folder = model.parent.resolve(strict=True)
        target = (folder / value).resolve(strict=True)
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise _refuse(model, field, value, "which does not exist") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop (before Python 3.13)
        raise _refuse(model, field, value, f"which cannot be followed ({getattr(e, 'strerror', None) or e})") from None
    if not target.is_relative_to(folder):
        raise _refuse(model, field, value, "a link that leads outside the model's folder")
    if not stat.S_ISREG(mode):
        raise _refuse(model, field, value, "which is not a regular file")
    return target


def read_file_beside_model(model: Path, field: str, path: Path) -> str:
    """The text of ``path`` (from :func:`file_beside_model`), refusing it if it was swapped for a
    link or a non-regular file since it was checked (the last step is not followed)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _refuse(model, field, path.name, f"which cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _refuse(model, field, path.name, "which is not a regular file")
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(model, field, path.name, "which is not UTF-8 text") from None
