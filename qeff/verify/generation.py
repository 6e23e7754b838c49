"""Verification by generation: a KV model, driven as a serving loop drives it (``OrtSession`` +
``generate``: right-padded chunked prefill, then greedy decode with the cache kept in the
session), against the original no-cache graph recomputing the whole sequence at every step.
The two are independent: the reference never sees a cache, a pad or a chunk boundary."""

from __future__ import annotations

__all__ = ["greedy_reference", "verify_kv_model"]

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qeff.common.onnxrt import onnxruntime_session
from qeff.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from qeff.errors import QeffError
from qeff.passes.ir.sample_inputs import vocab_size
from qeff.runtime import OrtSession, generate
from qeff.verify.outputs import relative_difference
from qeff.verify.result import Verification

_HINT = "check that the model is valid and its IR version is supported"
_CHUNK = 4


def greedy_reference(model: str | os.PathLike | bytes, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """Greedy generation with a no-cache graph, recomputing the whole sequence at every step:
    (tokens, logits) per prompt."""
    session = onnxruntime_session(model, hint=_HINT)
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    out_name = LOGITS if LOGITS in outputs else outputs[0]
    tokens, logits = [], []
    for prompt in prompts:
        seq = list(prompt)
        got_tokens, got_logits = [], []
        for _ in range(max_new_tokens):
            ids = np.asarray([seq], dtype=np.int64)
            feeds = {INPUT_IDS: ids}
            if ATTENTION_MASK in names:
                feeds[ATTENTION_MASK] = np.ones_like(ids)
            if POSITION_IDS in names:
                feeds[POSITION_IDS] = np.arange(ids.shape[1], dtype=np.int64)[None]
            row = session.run([out_name], feeds)[0][0, -1]
            got_logits.append(row.copy())
            got_tokens.append(int(np.argmax(row)))
            seq.append(got_tokens[-1])
        tokens.append(got_tokens)
        logits.append(got_logits)
    return tokens, logits


def _reference_vocab(path: str | os.PathLike) -> int:
    model = ir.load(path)
    ids = next((v for v in model.graph.inputs if v.name == INPUT_IDS), None)
    return (vocab_size(model.graph, ids) if ids is not None else None) or 100


def verify_kv_model(reference: str | os.PathLike, candidate: str | os.PathLike | bytes, *,
                    ctx_len: int | None = None, tolerance: float = 1e-4, prompt_lengths: Sequence[int] = (8, 5),
                    max_new_tokens: int = 16, seed: int = 0, fp16: bool = False) -> Verification:
    """Greedy generation with the KV model against the original graph recomputing everything.

    The steps compared per prompt run up to and including the first whose tokens disagree
    (after that the two continue from different sequences). With ``fp16`` the candidate is an
    fp16 simulation: it passes when its logits stay finite, at least 90% of the greedy tokens
    agree (fp16 rounding may flip a near tie), and each step's logits differ by at most
    ``tolerance`` × the reference's largest logit.
    """
    session = OrtSession(candidate, ctx_len=ctx_len)
    ctx = session.ctx_len or _static(session.spec(next(iter(session.retained))).shape[2])
    if ctx is None:
        raise QeffError("the cache length is symbolic and no ctx_len was given", "pass ctx_len")
    if ctx - max(prompt_lengths) + 1 < 2:  # a small cache: shorter prompts leave room to decode
        prompt_lengths = [max(1, ctx // 2), max(1, ctx // 3)]
    batch = _static(session.spec(INPUT_IDS).shape[0])
    if batch is not None:  # a model bound by fixed:batch_size=N takes N prompts
        prompt_lengths = [prompt_lengths[i % len(prompt_lengths)] for i in range(batch)]
    room = ctx - max(prompt_lengths) + 1
    steps = max(1, min(max_new_tokens, room))
    rng = np.random.default_rng(seed)
    vocab = _reference_vocab(reference)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in prompt_lengths]
    seq = _static(session.spec(INPUT_IDS).shape[1])
    with session:
        got = generate(session, prompts, steps, prefill_len=seq or _CHUNK, keep_logits=True)
        cache_finite = all(np.isfinite(v).all() for v in session.state().values()) if fp16 else True
    ref_tokens, ref_logits = greedy_reference(reference, prompts, steps)

    per_step = []
    for r in range(len(prompts)):
        for s in range(min(len(got.tokens[r]), len(ref_tokens[r]))):
            diff = float(np.max(np.abs(got.logits[r][s].astype(np.float64) - ref_logits[r][s])))
            same = got.tokens[r][s] == ref_tokens[r][s]
            per_step.append({"prompt": r, "step": s, "max_abs": diff, "token_match": same})
            if not same:
                break
    agree = sum(p["token_match"] for p in per_step)
    worst = max((p["max_abs"] for p in per_step), default=0.0)
    expected = len(prompts) * steps
    method = "greedy generation: KV model (chunked prefill, decode) vs the original graph recomputing the sequence"
    result = Verification(method=method, passed=bool(agree == expected and worst <= tolerance), tolerance=tolerance,
                          max_abs=worst, reference=str(Path(reference)), token_agreement=f"{agree}/{expected}",
                          steps=steps, prompts=[len(p) for p in prompts], ctx_len=ctx, per_step=per_step)
    if fp16:
        for p in per_step:
            p["max_rel"] = relative_difference(p["max_abs"], ref_logits[p["prompt"]][p["step"]])
        finite = cache_finite and all(np.isfinite(step).all() for row in got.logits for step in row)
        result.max_rel = max((p["max_rel"] for p in per_step), default=0.0)
        result.finite = bool(finite)
        result.method = f"{method}; the KV model in fp16 simulation"
        result.passed = bool(finite and agree >= math.ceil(0.9 * expected) and result.max_rel <= tolerance)
    return result


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None
