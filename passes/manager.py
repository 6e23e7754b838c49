"""The pass manager: validate a pipeline, run it with timing and change records, save, verify.

``run_passes`` works on an in-memory ``ir.Model``; ``optimize`` is the whole job behind
``qeff-opt``: load → validate → run → stage the output → verify → commit model, manifest
and report. Nothing appears at the output path unless every step succeeded.
"""

from __future__ import annotations

__all__ = ["PipelineResult", "run_passes", "optimize", "default_output_path"]

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qeff.errors import QeffError, VerificationError
from qeff.passes import manifest as manifest_mod
from qeff.passes.base import QeffPass
from qeff.passes.model_io import (
    ModelLike,
    StagedModel,
    as_ir_model,
    check_output_path,
    external_data_files,
)
from qeff.passes.pipeline import (
    HISTORY_KEY,
    applied_passes,
    build_passes,
    parse_pipeline,
    validate_sequence,
)
from qeff.passes.report import GraphSnapshot, PassRecord, Report

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    report: Report
    manifest: dict[str, Any]
    output: Path | None = None
    manifest_path: Path | None = None


def _resolve_passes(
    passes: str | Sequence[QeffPass | str], overrides: dict[str, str] | None
) -> list[QeffPass]:
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


def run_passes(
    model: ir.Model,
    passes: str | Sequence[QeffPass | str],
    *,
    manifest: dict[str, Any] | None = None,
    overrides: dict[str, str] | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Run passes in place on ``model`` (validated first), recording what each one changed."""
    pipeline = _resolve_passes(passes, overrides)
    history = applied_passes(model)
    validate_sequence(pipeline, history)
    manifest = manifest_mod.new_manifest(manifest)
    report = Report()
    for p in pipeline:
        p.progress = progress
        before = GraphSnapshot.take(model)
        start = time.perf_counter()
        result = _call_pass(p, model)
        seconds = time.perf_counter() - start
        after = GraphSnapshot.take(result.model)
        record = PassRecord.compare(
            p.name, p.options_dict(), seconds, result.modified, before, after, p.details
        )
        report.passes.append(record)
        logger.info("%s: %.2f s, nodes %d -> %d", p.name, seconds, before.nodes, after.nodes)
        history.append({"name": p.name, "options": p.options_dict()})
        manifest["passes"].append({"name": p.name, "options": p.options_dict()})
        p.update_manifest(manifest, model)
    model.metadata_props[HISTORY_KEY] = json.dumps(history, default=str)
    manifest_mod.finish_manifest(manifest, model)
    return PipelineResult(model=model, report=report, manifest=manifest)


def _call_pass(p: QeffPass, model: ir.Model) -> ir.passes.PassResult:
    try:
        return p(model)
    except ir.passes.PreconditionError as e:
        # onnx-ir wraps what ``requires`` raises; surface the user-facing error itself.
        if isinstance(e.__cause__, QeffError):
            raise e.__cause__ from None
        raise


def default_output_path(input_path: Path, pipeline: Sequence[QeffPass]) -> Path:
    """``model.onnx`` with ``kv,fp16clip`` → ``model.kv.fp16clip.onnx``."""
    stem = input_path.name[: -len(".onnx")] if input_path.name.endswith(".onnx") else input_path.name
    return input_path.with_name(f"{stem}.{'.'.join(p.name for p in pipeline)}.onnx")


def optimize(
    model: ModelLike,
    passes: str | Sequence[QeffPass | str],
    output: str | os.PathLike | None = None,
    *,
    verify: bool = False,
    tolerance: float | None = None,
    report_path: str | os.PathLike | None = None,
    overrides: dict[str, str] | None = None,
    external_data: bool | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Run ``passes`` on ``model`` and (when ``output`` is given) write the result atomically.

    ``model`` may be a path, ``onnx.ModelProto``, ``ir.Model`` or ``onnx_graphsurgeon.Graph``;
    an ``ir.Model`` given in is cloned, never modified. With ``verify`` the original and the
    rewritten model run in onnxruntime and a difference above ``tolerance`` raises
    :class:`VerificationError` (the output is then not written). When a pass prepares the model
    for fp16 compute (``fp16clip``) the rewritten model runs in fp16 simulation and ``tolerance``
    is relative to the reference's largest output value (default 1e-2); otherwise it is the max
    abs difference (default 1e-4).
    """
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    pipeline = _resolve_passes(passes, overrides)
    ir_model = as_ir_model(model)
    if ir_model is model:
        ir_model = ir_model.clone()
    protected = external_data_files(ir_model)
    if input_path is not None:
        protected.add(input_path.resolve())
    if output is not None:
        check_output_path(output, inputs=protected)
    previous = manifest_mod.read_manifest(input_path) if input_path else None

    result = run_passes(ir_model, pipeline, manifest=previous, progress=progress)
    result.report.input = str(input_path) if input_path else None
    result.manifest["source"] = (previous or {}).get("source") or result.report.input

    with tempfile.TemporaryDirectory(prefix="qeff-verify-") as scratch:
        reference = input_path
        if verify and reference is None:
            # An in-memory input: the reference is the model as it was given.
            reference = Path(scratch) / "reference.onnx"
            StagedModel(as_ir_model(model), reference).commit()
        if output is not None:
            staged = StagedModel(result.model, output, external_data=external_data, progress=progress)
        elif verify:
            staged = StagedModel(result.model, Path(scratch) / "candidate.onnx")
        else:
            staged = None
        try:
            if verify:
                result.report.verification = _verify(pipeline, reference, staged.path, tolerance, Path(scratch))
            verified = not verify or result.report.verification["passed"]
            if output is not None and verified:
                result.output = staged.commit()
                result.manifest_path = manifest_mod.write_manifest(result.output, result.manifest)
                result.report.output = str(result.output)
        finally:
            if staged is not None:
                staged.discard()
            if report_path is not None:
                result.report.write_json(report_path)
    if result.report.verification and not result.report.verification["passed"]:
        v = result.report.verification
        measure = "max_rel" if "max_rel" in v else "max_abs"
        by = f"{v[measure]:.3g}" + (" of the largest reference value" if measure == "max_rel" else "")
        if "token_agreement" in v:
            what = f"greedy tokens agree {v['token_agreement']}, logits differ by up to {by}"
        else:
            worst = max(v["outputs"], key=lambda k: v["outputs"][k][measure] if measure in v["outputs"][k] else 0)
            what = f"output {worst!r} differs by {by}"
        if v.get("finite") is False:
            what = f"the fp16 simulation gives NaN or Inf ({what})"
        raise VerificationError(
            f"--verify failed: {what} (tolerance {v['tolerance']:g}); nothing was written",
            "inspect the report (--report) or raise --tolerance if the difference is expected",
        )
    return result


FP32_TOLERANCE = 1e-4  # max abs difference
FP16_TOLERANCE = 1e-2  # relative to the reference's largest value


def fp16_simulation_keep(pipeline: Sequence[QeffPass]) -> list[str] | None:
    """When a pass prepared the model for fp16 compute: the values every such pass keeps in
    fp32 (what the fp16 simulation must not round). None when no pass did."""
    keeps = [k for p in pipeline if (k := p.fp16_simulation()) is not None]
    return [name for keep in keeps for name in keep] if keeps else None


def _verify(
    pipeline: Sequence[QeffPass], reference: Path, candidate: Path, tolerance: float | None, scratch: Path
) -> dict[str, Any]:
    """The last pass that knows how to drive the rewritten model verifies; else the generic check.
    A pipeline that prepares the model for fp16 verifies its fp16 simulation."""
    keep = fp16_simulation_keep(pipeline)
    fp16 = keep is not None
    lossy = tolerance is None and any(p.lossy for p in pipeline)
    if tolerance is None:
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    summary = _compare(pipeline, reference, candidate, tolerance, scratch, keep)
    if lossy:
        # Quantization changes the numbers by design: report them, fail only when they break.
        summary["lossy"] = True
        summary["passed"] = bool(summary.get("finite", True) and math.isfinite(summary["max_abs"]))
    return summary


def _compare(pipeline: Sequence[QeffPass], reference: Path, candidate: Path, tolerance: float, scratch: Path,
             keep: list[str] | None) -> dict[str, Any]:
    from qeff.passes.verify import verify_models

    fp16 = keep is not None
    if fp16:
        import onnx

        from qeff.passes.fp16sim import simulate_fp16

        simulated = scratch / "candidate.fp16-simulation.onnx"
        onnx.save(simulate_fp16(candidate, keep_fp32=keep), simulated)
        candidate = simulated
    for p in reversed(pipeline):
        summary = p.verify(reference, candidate, tolerance, fp16=fp16)
        if summary is not None:
            return summary
    return verify_models(reference, candidate, tolerance=tolerance, fp16=fp16)
