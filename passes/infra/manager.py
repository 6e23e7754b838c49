"""The pass manager: validate a pipeline, run it with timing and change records, build the manifest.

``run_passes`` works on an in-memory ``ir.Model``. Writing the result and verifying it is
:func:`qeff.optimize`, which sits above the stages.
"""

from __future__ import annotations

__all__ = ["PipelineResult", "run_passes", "resolve_passes", "default_output_path", "new_manifest"]

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qeff.contract import KVLayout, Manifest
from qeff.passes.infra.base import QeffPass, QeffPassResult
from qeff.passes.infra.pipeline import HISTORY_KEY, applied_passes, build_passes, parse_pipeline, validate_sequence
from qeff.passes.infra.report import GraphSnapshot, PassRecord, Report

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    report: Report
    manifest: Manifest
    # The values the card keeps in fp32 when a pass prepared the model for fp16 compute (the
    # fp16 simulation then rounds everything else); None when no pass did.
    fp16_keep: list[str] | None = None
    output: Path | None = None
    manifest_path: Path | None = None


def resolve_passes(passes: str | Sequence[QeffPass | str], overrides: dict[str, str] | None = None) -> list[QeffPass]:
    """Pass objects from a pipeline text, names, or pass objects."""
    if isinstance(passes, str):
        return build_passes(parse_pipeline(passes), overrides)
    resolved: list[QeffPass] = []
    for p in passes:
        if isinstance(p, str):
            resolved.extend(build_passes(parse_pipeline(p), overrides))
        elif isinstance(p, QeffPass):
            resolved.append(p)
        else:
            raise TypeError(f"expected a pass name or QeffPass, got {type(p).__name__}")
    return resolved


def new_manifest(previous: Manifest | None = None) -> Manifest:
    """A manifest carrying ``previous`` forward (passes run in several invocations accumulate)."""
    from qeff import __version__

    manifest = dataclasses.replace(previous) if previous is not None else Manifest()
    manifest.passes = list(manifest.passes)
    manifest.generator = f"qeff-opt {__version__}"
    return manifest


def _io_specs(values: Any) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        dtype = v.dtype.name.lower() if v.dtype is not None else None
        shape = None
        if v.shape is not None:
            shape = [d if isinstance(d, int) else (d.value if d.value is not None else "?") for d in v.shape]
        specs.append({"name": v.name, "dtype": dtype, "shape": shape})
    return specs


def _merge(manifest: Manifest, sections: dict[str, Any]) -> None:
    """Set the sections a pass returned; ``custom_io``, ``side_files`` and ``kv`` fields merge."""
    for key, value in sections.items():
        if key in ("custom_io", "side_files"):
            getattr(manifest, key).update(value)
        elif key == "kv" and isinstance(value, dict):
            base = dataclasses.asdict(manifest.kv) if manifest.kv is not None else {}
            manifest.kv = KVLayout(**{**base, **value})
        elif hasattr(manifest, key):
            setattr(manifest, key, value)
        else:
            raise TypeError(f"a pass set the unknown manifest section {key!r}")


def run_passes(
    model: ir.Model,
    passes: str | Sequence[QeffPass | str],
    *,
    manifest: Manifest | None = None,
    overrides: dict[str, str] | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Run passes in place on ``model`` (validated first), recording what each one changed."""
    pipeline = resolve_passes(passes, overrides)
    history = applied_passes(model)
    validate_sequence(pipeline, history)
    manifest = new_manifest(manifest)
    report = Report()
    keeps: list[tuple[str, ...]] = []
    for p in pipeline:
        p.progress = progress
        before = GraphSnapshot.take(model)
        start = time.perf_counter()
        result = p(model)
        seconds = time.perf_counter() - start
        details = result.details if isinstance(result, QeffPassResult) else {}
        after = GraphSnapshot.take(result.model)
        report.passes.append(PassRecord.compare(p.name, p.options_dict(), seconds, result.modified, before, after,
                                                details))
        logger.info("%s: %.2f s, nodes %d -> %d", p.name, seconds, before.nodes, after.nodes)
        history.append({"name": p.name, "options": p.options_dict()})
        manifest.passes.append({"name": p.name, "options": p.options_dict()})
        if isinstance(result, QeffPassResult):
            _merge(manifest, result.manifest)
            if result.fp16_keep is not None:
                keeps.append(result.fp16_keep)
    model.metadata_props[HISTORY_KEY] = json.dumps(history, default=str)
    manifest.inputs = _io_specs(model.graph.inputs)
    manifest.outputs = _io_specs(model.graph.outputs)
    fp16_keep = [name for keep in keeps for name in keep] if keeps else None
    return PipelineResult(model=model, report=report, manifest=manifest, fp16_keep=fp16_keep)


def default_output_path(input_path: Path, pipeline: Sequence[QeffPass]) -> Path:
    """``model.onnx`` with ``kv,fp16clip`` → ``model.kv.fp16clip.onnx``."""
    stem = input_path.name[: -len(".onnx")] if input_path.name.endswith(".onnx") else input_path.name
    return input_path.with_name(f"{stem}.{'.'.join(p.name for p in pipeline)}.onnx")
