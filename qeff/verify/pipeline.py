"""The check ``--verify`` runs after a pipeline: which comparison, at which tolerance."""

from __future__ import annotations

__all__ = ["verify_pipeline", "FP32_TOLERANCE", "FP16_TOLERANCE"]

import math
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from qeff.contract import is_cache_input
from qeff.verify.generation import verify_kv_model
from qeff.verify.outputs import verify_models
from qeff.verify.quality import QualityThresholds, text_quality
from qeff.verify.result import Verification

FP32_TOLERANCE = 1e-4  # max abs difference
FP16_TOLERANCE = 1e-2  # relative to the reference's largest value


def _has_kv_cache(path: Path) -> bool:
    return any(is_cache_input(v.name) for v in ir.load(path).graph.inputs)


def verify_pipeline(reference: Path, candidate: Path, *, scratch: Path, tolerance: float | None = None,
                    fp16_keep: Sequence[str] | None = None, lossy: bool = False,
                    ctx_len: int | None = None, text: tuple[Path | None, Path] | None = None,
                    thresholds: QualityThresholds | None = None) -> Verification:
    """Compare ``candidate`` (what the pipeline wrote) with ``reference`` (its input).

    - A model that has a KV cache and a reference that does not are compared by generation
      (:func:`~qeff.verify.generation.verify_kv_model`); anything else on the same inputs.
    - ``fp16_keep`` (the values a pass keeps in fp32; empty when none) means the pipeline
      prepared the model for fp16 compute: the candidate runs in fp16 simulation and the
      tolerance (default 1e-2) is relative to the reference's largest value. Otherwise it is the
      max abs difference (default 1e-4).
    - ``lossy`` (a quantizing pass ran) with no tolerance given: the numbers are reported, and
      only NaN/Inf fail.
    - ``text`` ((text file or None for the held-out split, tokenizer); see
      :func:`~qeff.verify.quality.verification_text`) with a lossy or fp16 pipeline: the
      candidate is also evaluated on the text against the reference, and fails beyond
      ``thresholds`` (:mod:`qeff.verify.quality`).
    """
    fp16 = fp16_keep is not None
    report_only = lossy and tolerance is None
    if tolerance is None:
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    if fp16:
        import onnx

        from qeff.passes.fp16.simulation import simulate_fp16

        # Beside the candidate: the simulation refers to the candidate's data file, by a
        # path relative to its folder, instead of holding a copy of every weight.
        simulated = candidate.with_name(candidate.stem + ".fp16-simulation.onnx")
        onnx.save(simulate_fp16(candidate, keep_fp32=fp16_keep), simulated)
        candidate = simulated
    if _has_kv_cache(candidate) and not _has_kv_cache(reference):
        result = verify_kv_model(reference, candidate, ctx_len=ctx_len, tolerance=tolerance, fp16=fp16)
    else:
        result = verify_models(reference, candidate, tolerance=tolerance, fp16=fp16)
    if report_only:
        result.lossy = True
        result.passed = bool(result.finite is not False and math.isfinite(result.max_abs))
    if text is not None and (lossy or fp16):
        result.quality = text_quality(reference, candidate, text=text[0], tokenizer=text[1],
                                      thresholds=thresholds or QualityThresholds(), ctx_len=ctx_len)
        result.passed = bool(result.passed and result.quality["passed"])
    return result
