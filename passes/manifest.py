"""The manifest ``<model>.qeff.json`` written beside every output model.

It tells the backend what the passes did without re-analysing the graph: the passes and their
options, the model's I/O, and the sections later passes fill (KV layout, retained-state names,
MX format, ctx_len, suggested specializations, node-precision file). A manifest found beside
an input model is carried forward, so running passes in several invocations accumulates.
"""

from __future__ import annotations

__all__ = ["MANIFEST_FORMAT", "manifest_path", "read_manifest", "new_manifest", "write_manifest", "finish_manifest", "io_specs"]

import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "qeff-manifest/1"


def manifest_path(model_path: str | os.PathLike) -> Path:
    """``dir/name.onnx`` → ``dir/name.qeff.json``."""
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".qeff.json")


def read_manifest(model_path: str | os.PathLike) -> dict[str, Any] | None:
    path = manifest_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable manifest %s: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        logger.warning("ignoring %s: not a %s manifest", path, MANIFEST_FORMAT)
        return None
    return data


def io_specs(values: Any) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        dtype = v.dtype.name.lower() if v.dtype is not None else None
        shape = None
        if v.shape is not None:
            shape = [d if isinstance(d, int) else (d.value if d.value is not None else "?") for d in v.shape]
        specs.append({"name": v.name, "dtype": dtype, "shape": shape})
    return specs


def new_manifest(previous: dict[str, Any] | None = None) -> dict[str, Any]:
    from qeff import __version__

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "generator": f"qeff-opt {__version__}",
        "model": None,
        "source": None,
        "passes": [],
        "inputs": [],
        "outputs": [],
        "kv": None,
        "retained_state": [],
        "mx": None,
        "ctx_len": None,
        "specializations": [],
        "node_precision_file": None,
    }
    if previous:
        for key, value in previous.items():
            if key not in ("format", "generator"):
                manifest[key] = value
    return manifest


def finish_manifest(manifest: dict[str, Any], model: ir.Model) -> dict[str, Any]:
    manifest["inputs"] = io_specs(model.graph.inputs)
    manifest["outputs"] = io_specs(model.graph.outputs)
    return manifest


def write_manifest(model_path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = manifest_path(model_path)
    manifest = dict(manifest, model=Path(model_path).name)
    # Files a pass hands to the backend (e.g. fp16clip's -node-precision-info YAML) are written
    # next to the model; the manifest records their names.
    for key, (suffix, text) in manifest.pop("side_files", {}).items():
        side = Path(model_path).with_name(Path(model_path).stem + suffix)
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(text)
        os.replace(side_tmp, side)
        manifest[key] = side.name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
