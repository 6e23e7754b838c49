"""Verification on the same inputs: run both models in onnxruntime, compare outputs by name.

Inputs come from the reference's own signature (:func:`qeff.passes.ir.sample_inputs`) unless
given; sizes the rewritten model fixed (``fixed:seq_len=1``) decide the reference's symbols too.
A rewritten model that takes inputs the original does not has a new interface, which this
comparison refuses rather than comparing nothing.
"""

from __future__ import annotations

__all__ = ["compare_outputs", "verify_models", "relative_difference"]

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qeff.common.onnxrt import run_model
from qeff.errors import UnsupportedGraphError
from qeff.passes.ir.sample_inputs import sample_inputs
from qeff.verify.result import Verification

_LOAD_HINT = "drop --verify, or make the model loadable by onnxruntime (e.g. an IR version it supports)"


def _fixed_by(reference: ir.Model, candidate: ir.Model) -> dict[str, int]:
    """Symbolic dims of the reference that the candidate has as numbers, by input position."""
    sizes: dict[str, int] = {}
    fixed = {v.name: v.shape for v in candidate.graph.inputs if v.shape is not None}
    for value in reference.graph.inputs:
        shape = fixed.get(value.name)
        if value.shape is None or shape is None or len(shape) != len(value.shape):
            continue
        for ref_dim, cand_dim in zip(value.shape, shape):
            if not isinstance(ref_dim, int) and ref_dim.value and isinstance(cand_dim, int):
                sizes[ref_dim.value] = cand_dim
    return sizes


def compare_outputs(reference: Mapping[str, np.ndarray],
                    candidate: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Max abs difference per output both have (NaN/Inf where both agree count as equal)."""
    result = {}
    for name, ref in reference.items():
        if name not in candidate:
            continue
        got = candidate[name]
        if ref.shape != got.shape:
            result[name] = {"shape": list(ref.shape), "candidate_shape": list(got.shape), "max_abs": float("inf")}
            continue
        if ref.size == 0:
            diff = 0.0
        elif ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
            diff = float(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64))))
        else:
            a = ref.astype(np.float64)
            b = got.astype(np.float64)
            same_nonfinite = (~np.isfinite(a)) & (a == b) | (np.isnan(a) & np.isnan(b))
            delta = np.where(same_nonfinite, 0.0, np.abs(a - b))
            diff = float(np.nan_to_num(np.max(delta), nan=np.inf))
        result[name] = {"shape": list(ref.shape), "max_abs": diff}
    return result


def relative_difference(max_abs: float, reference: np.ndarray) -> float:
    """``max_abs`` relative to the largest finite magnitude of ``reference``."""
    values = np.abs(reference[np.isfinite(reference)].astype(np.float64))
    peak = float(values.max()) if values.size else 0.0
    return max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf"))


def verify_models(reference: str | os.PathLike, candidate: str | os.PathLike, *, tolerance: float = 1e-4,
                  feeds: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                  dims: Mapping[str, int] | None = None, fp16: bool = False) -> Verification:
    """Compare two model files on the same inputs.

    With ``fp16`` the candidate is an fp16 simulation: it passes when its outputs are finite and
    every output's max difference is within ``tolerance`` × the reference output's largest value.
    """
    ref_model = ir.load(reference)
    cand_model = ir.load(candidate)
    ref_inputs = {v.name for v in ref_model.graph.inputs}
    extra = [v.name for v in cand_model.graph.inputs if v.name not in ref_inputs]
    if extra:
        raise UnsupportedGraphError(
            f"the rewritten model takes inputs the original does not ({', '.join(extra)}), so "
            "the same-inputs --verify cannot compare them",
            "verify with the verifier of the pass that changed the interface",
        )
    if feeds is None:
        feeds = sample_inputs(ref_model, seed=seed, dims={**_fixed_by(ref_model, cand_model), **(dims or {})})
    del ref_model, cand_model  # release the memory maps before onnxruntime opens the files
    ref_out = run_model(reference, feeds, purpose=" for --verify", hint=_LOAD_HINT)
    cand_out = run_model(candidate, feeds, purpose=" for --verify", hint=_LOAD_HINT)
    per_output = compare_outputs(ref_out, cand_out)
    if not per_output:
        raise UnsupportedGraphError("the rewritten model shares no output name with the original; nothing to compare",
                                    "keep at least one output name")
    worst = max(v["max_abs"] for v in per_output.values())
    result = Verification(method="onnxruntime, same inputs, outputs compared by name", passed=bool(worst <= tolerance),
                          tolerance=tolerance, max_abs=worst, reference=str(Path(reference)),
                          inputs={k: list(v.shape) for k, v in feeds.items()}, outputs=per_output)
    if fp16:
        floats = [n for n in per_output if np.issubdtype(ref_out[n].dtype, np.floating)]
        for name in floats:
            per_output[name]["max_rel"] = relative_difference(per_output[name]["max_abs"], ref_out[name])
        finite = all(np.isfinite(cand_out[n]).all() for n in floats)
        worst_rel = max((per_output[n]["max_rel"] for n in floats), default=0.0)
        result.method = "onnxruntime, same inputs; the rewritten model in fp16 simulation"
        result.finite, result.max_rel = bool(finite), worst_rel
        result.passed = bool(finite and worst_rel <= tolerance)
    return result
