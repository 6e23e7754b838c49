"""``--verify``: run the original and the rewritten model in onnxruntime and compare outputs.

Inputs are generated from the models' own signatures (see ``sample_inputs``) unless given.
Every output the two models share by name is compared; the result records the max abs
difference per output, and ``passed`` says whether all stay within the tolerance. Models
whose interface changed (a KV cache added, say) need a verifier that knows the new
contract; the generic one refuses them with a clear message rather than comparing nothing.
"""

from __future__ import annotations

__all__ = ["sample_inputs", "onnxruntime_session", "run_onnxruntime", "compare_outputs", "verify_models"]

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qeff.errors import UnsupportedGraphError, VerificationError

logger = logging.getLogger(__name__)

# Symbolic dims whose name says they are a batch get a small batch; everything else is a
# sequence-like length long enough to exercise masks and padding.
DEFAULT_BATCH = 2
DEFAULT_LENGTH = 8


def _dim_value(dim: Any, dims: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    name = getattr(dim, "value", None) or ""
    if name in dims:
        return dims[name]
    if re.search(r"batch", name, re.IGNORECASE):
        return DEFAULT_BATCH
    return DEFAULT_LENGTH


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


def _vocab_size(graph: ir.Graph, value: ir.Value) -> int | None:
    """The row count of the embedding table this ids input indexes, if it feeds a Gather."""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            if table is not None and table.shape is not None and isinstance(table.shape[0], int):
                return table.shape[0]
    return None


def sample_inputs(
    model: ir.Model, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Plausible inputs for a language-model-like graph; generic random data otherwise.

    ``input_ids`` are drawn below the embedding table's size, ``attention_mask`` right-pads
    the last row by a quarter of the sequence, ``position_ids`` count valid tokens as
    Hugging Face does. Other ints are zero, bools true, floats standard normal.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.shape is None or value.dtype is None:
            raise UnsupportedGraphError(
                f"input {value.name!r} has no declared shape or type, so --verify cannot "
                "generate data for it",
                "declare the input's shape in the model",
            )
        shape = tuple(_dim_value(d, dims) for d in value.shape)
        np_dtype = value.dtype.numpy()
        name = value.name
        is_int = np.issubdtype(np_dtype, np.integer)
        if is_int and name.endswith("input_ids"):
            vocab = _vocab_size(model.graph, value) or 100
            feeds[name] = rng.integers(0, vocab, size=shape).astype(np_dtype)
        elif name == "attention_mask" and len(shape) == 2:
            mask = np.ones(shape, dtype=np_dtype)
            if shape[0] > 1 and shape[1] > 2:
                mask[-1, shape[1] - max(1, shape[1] // 4) :] = 0
            feeds[name] = mask
        elif is_int:
            feeds[name] = np.zeros(shape, dtype=np_dtype)
        elif value.dtype == ir.DataType.BOOL:
            feeds[name] = np.ones(shape, dtype=bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np_dtype)
    if "position_ids" in feeds and "attention_mask" in feeds:
        mask = feeds["attention_mask"].astype(np.int64)
        if feeds["position_ids"].shape == mask.shape:
            feeds["position_ids"] = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(
                feeds["position_ids"].dtype
            )
    elif "position_ids" in feeds:
        pos = feeds["position_ids"]
        if pos.ndim == 2:
            feeds["position_ids"] = np.broadcast_to(np.arange(pos.shape[1]), pos.shape).astype(pos.dtype)
    return feeds


def onnxruntime_session(model: str | os.PathLike | bytes, providers: list[str] | None = None, *,
                        purpose: str = "", hint: str | None = None, optimize: bool = True,
                        threads: int | None = None):
    """An onnxruntime session (CPU unless providers say otherwise, warnings silenced); a model
    onnxruntime cannot load is a :class:`VerificationError` naming the model and the reason.
    ``optimize=False`` turns graph optimisations off, for graphs whose every node must run as
    written (the fp16 simulation's rounding casts); ``threads`` caps the intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors share no base class beyond Exception
        name = "the model" if isinstance(model, bytes) else Path(model).name
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VerificationError(f"onnxruntime cannot load {name}{purpose}: {reason}", hint) from e


def run_onnxruntime(
    path: str | os.PathLike, feeds: Mapping[str, np.ndarray], providers: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run a model file on onnxruntime (CPU unless providers say otherwise)."""
    session = onnxruntime_session(
        path, providers, purpose=" for --verify",
        hint="drop --verify, or make the model loadable by onnxruntime (e.g. an IR version it supports)",
    )
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, outputs))


def compare_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
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


def verify_models(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    tolerance: float = 1e-4,
    feeds: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    fp16: bool = False,
) -> dict[str, Any]:
    """Compare two model files on the same inputs; returns a JSON-able summary.

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
            "the generic --verify cannot compare them",
            "verify with the verifier of the pass that changed the interface",
        )
    if feeds is None:
        # Sizes the rewritten model fixed (fixed:seq_len=1) decide the reference's symbols too.
        feeds = sample_inputs(ref_model, seed=seed, dims={**_fixed_by(ref_model, cand_model), **(dims or {})})
    del ref_model, cand_model  # release the memory maps before onnxruntime opens the files
    ref_out = run_onnxruntime(reference, feeds)
    cand_out = run_onnxruntime(candidate, feeds)
    per_output = compare_outputs(ref_out, cand_out)
    if not per_output:
        raise UnsupportedGraphError(
            "the rewritten model shares no output name with the original; nothing to compare",
            "keep at least one output name",
        )
    worst = max(v["max_abs"] for v in per_output.values())
    summary = {
        "method": "onnxruntime, same inputs, outputs compared by name",
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "outputs": per_output,
        "max_abs": worst,
        "tolerance": tolerance,
        "passed": bool(worst <= tolerance),
        "reference": str(Path(reference)),
    }
    if fp16:
        floats = [n for n in per_output if np.issubdtype(ref_out[n].dtype, np.floating)]
        for name in floats:
            per_output[name]["max_rel"] = relative_difference(per_output[name]["max_abs"], ref_out[name])
        finite = all(np.isfinite(cand_out[n]).all() for n in floats)
        worst_rel = max((per_output[n]["max_rel"] for n in floats), default=0.0)
        summary.update(method="onnxruntime, same inputs; the rewritten model in fp16 simulation",
                       finite=bool(finite), max_rel=worst_rel, passed=bool(finite and worst_rel <= tolerance))
    return summary


def relative_difference(max_abs: float, reference: np.ndarray) -> float:
    """``max_abs`` relative to the largest finite magnitude of ``reference``."""
    values = np.abs(reference[np.isfinite(reference)].astype(np.float64))
    peak = float(values.max()) if values.size else 0.0
    return max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf"))
