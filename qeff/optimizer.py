"""``qeff.optimize``: the whole job behind ``qeff-opt``.

load → validate → run the passes → stage the output → verify → commit model, manifest and
report. Nothing appears at the output path unless every step succeeded. It sits above the
passes because ``--verify`` drives rewritten models through the runtime.
"""

from __future__ import annotations

__all__ = ["optimize"]

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qeff.common.paths import check_output_file, model_files
from qeff.contract import manifest_path, read_manifest, write_manifest
from qeff.errors import QeffError, VerificationError
from qeff.passes import PipelineResult, QeffPass, run_passes
from qeff.passes.infra.manager import resolve_passes
from qeff.passes.ir.model_io import (ModelLike, StagedModel, as_ir_model, check_model, check_output_path,
                                     external_data_files)
from qeff.verify import failure_message, verify_pipeline
from qeff.verify.quality import QualityThresholds, verification_text


def _previous_manifest(input_path: Path | None):
    return read_manifest(input_path) if input_path is not None else None


def _check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise QeffError(f"tolerance {tolerance} is not a number >= 0", "e.g. --tolerance 1e-3")


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
    link_data: bool = False,
    progress: bool = False,
    verify_text: str | os.PathLike | None = None,
    quality: QualityThresholds | None = None,
) -> PipelineResult:
    """Run ``passes`` on ``model`` and (when ``output`` is given) write the result atomically.

    ``model`` may be a path, ``onnx.ModelProto``, ``ir.Model`` or ``onnx_graphsurgeon.Graph``;
    what is given in is never modified (an ``ir.Model`` is cloned, a proto copied). With
    ``verify`` the original and the rewritten model run in onnxruntime (see
    :func:`qeff.verify.verify_pipeline`) and a difference above ``tolerance`` raises
    :class:`VerificationError` (the output is then not written). Every path is checked before
    any work: the output and the report may not be an input file, its data or its manifest, or
    each other. A lossy pipeline (MX, fp16clip) is also verified on a text when one is available
    (``verify_text``, or the held-out split for the reference model; see
    :mod:`qeff.verify.quality`), failing beyond ``quality``'s thresholds. ``link_data`` shares the input's unchanged weights with the output through a
    hard link to its data file instead of copying them (see ``qeff-opt --help``).
    """
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    _check_tolerance(tolerance)
    if link_data and external_data is False:
        raise QeffError("--link-data shares the input's data file and --no-external-data asks for none",
                        "drop one of the two")
    pipeline = resolve_passes(passes, overrides)
    ir_model = as_ir_model(model)
    if ir_model is model:
        ir_model = ir_model.clone()
        check_model(ir_model)
    protected = external_data_files(ir_model)
    if input_path is not None:
        protected |= model_files(input_path)
    if output is not None:
        check_output_path(output, inputs=protected)
    if report_path is not None:
        written = model_files(output) if output is not None else set()
        check_output_file(report_path, "the report", protected | written)
    previous = _previous_manifest(input_path)
    text = None
    # Only a lossy or fp16 pipeline is measured on a text (qeff.verify.pipeline): no other looks for one.
    if verify and (verify_text is not None or any(p.lossy or p.name == "fp16clip" for p in pipeline)):
        if verify_text is not None and input_path is None:
            raise QeffError("--verify-text needs the model as a file, to find its tokenizer",
                            "save the model first, with its tokenizer.json beside it")
        text = verification_text(input_path, verify_text) if input_path is not None else None

    result = run_passes(ir_model, pipeline, manifest=previous, progress=progress)
    result.report.input = str(input_path) if input_path else None
    result.manifest.source = (previous.source if previous else None) or result.report.input

    with tempfile.TemporaryDirectory(prefix="qeff-verify-") as scratch:
        reference = input_path
        if verify and reference is None:
            # An in-memory input: the reference is the model as it was given.
            reference = Path(scratch) / "reference.onnx"
            StagedModel(as_ir_model(model), reference).commit()
        if output is not None:
            staged = StagedModel(result.model, output, external_data=external_data, progress=progress,
                                 protected=protected, link_data=link_data)
        elif verify:
            staged = StagedModel(result.model, Path(scratch) / "candidate.onnx")
        else:
            staged = None
        try:
            if verify:
                result.report.verification = verify_pipeline(
                    reference, staged.path, scratch=Path(scratch), tolerance=tolerance, fp16_keep=result.fp16_keep,
                    lossy=any(p.lossy for p in pipeline), ctx_len=result.manifest.ctx_len, text=text,
                    thresholds=quality)
            verified = not verify or result.report.verification.passed
            if output is not None and verified:
                # The manifest and its side files are staged beside the model and committed with
                # it: an interrupted run leaves the old pair or the new one, never a mix.
                written = write_manifest(staged.path, result.manifest)
                result.output = staged.commit(companions=[p.name for p in written])
                result.manifest_path = manifest_path(result.output)
                result.report.output = str(result.output)
        finally:
            if staged is not None:
                staged.discard()
    # Also when verification failed (the report says why); not when a step raised or the run
    # was interrupted.
    if report_path is not None:
        result.report.write_json(report_path)
    verification = result.report.verification
    if verification is not None and not verification.passed:
        raise VerificationError(failure_message(verification),
                                "inspect the report (--report) or raise --tolerance if the difference is expected")
    return result
