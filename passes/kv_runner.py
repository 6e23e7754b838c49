"""Drive a KV-cache model (DESIGN §3.1) in onnxruntime, and ``--verify`` it against the original.

``KVRunner`` does what a serving loop does: right-padded chunked prefill (``position_ids =
-1`` on pads), then greedy decode one token per step, the cache carried from each call's
``…_RetainedState`` outputs into the next call's ``past_*`` inputs (optionally into chosen
rows of a larger cache through ``batch_index``). ``greedy_reference`` recomputes the whole
sequence with the original no-cache graph at every step, so the two are independent: the
reference never sees a cache, a pad or a chunk boundary.
"""

from __future__ import annotations

__all__ = ["KVRunner", "Generation", "greedy_reference", "logits_differences", "verify_kv_model"]

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qeff.errors import QeffError, UnsupportedGraphError
from qeff.passes.kv_builder import cache_inputs_in_layer_order



def _session(model: str | os.PathLike | bytes):
    from qeff.passes.verify import onnxruntime_session

    return onnxruntime_session(model, hint="check that the model is valid and its IR version is supported")


@dataclasses.dataclass
class Generation:
    """Per prompt: generated tokens and the logits each was chosen from (step 0 = prefill)."""

    tokens: list[list[int]]
    logits: list[list[np.ndarray]]
    cache_after_prefill: dict[str, np.ndarray]
    cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # after the last step
    # Time spent in onnxruntime calls: the prefill chunks, then the decode steps.
    prefill_calls: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class KVRunner:
    """A KV-cache model in onnxruntime, with its cache as numpy arrays between calls."""

    def __init__(self, model: str | os.PathLike | bytes, ctx_len: int | None = None):
        self.session = _session(model)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "position_ids" not in inputs:
            raise UnsupportedGraphError("not a KV-cache model: input_ids/position_ids inputs missing")
        self.past_names = cache_inputs_in_layer_order(inputs)
        if not self.past_names:
            raise UnsupportedGraphError("not a KV-cache model: no past_key.{i}/past_value.{i} inputs",
                                        "run the kv pass first")
        self.continuous = "batch_index" in inputs
        first = inputs[self.past_names[0]]
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        self.specs = {n: inputs[n].shape for n in self.past_names}
        static_ctx = first.shape[2] if isinstance(first.shape[2], int) else None
        if ctx_len is None:
            ctx_len = static_ctx
        if ctx_len is None:
            raise QeffError("the cache length is symbolic and no ctx_len was given", "pass ctx_len")
        if static_ctx is not None and static_ctx != ctx_len:
            raise QeffError(f"ctx_len {ctx_len} does not match the model's fixed cache length {static_ctx}")
        self.ctx_len = ctx_len
        batch, seq = inputs["input_ids"].shape
        self.static_seq = seq if isinstance(seq, int) else None
        self.static_batch = batch if isinstance(batch, int) else None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def new_cache(self, rows: int) -> dict[str, np.ndarray]:
        cache = {}
        for name in self.past_names:
            _, heads, _, dim = self.specs[name]
            cache[name] = np.zeros((rows, heads, self.ctx_len, dim), dtype=self.cache_dtype)
        return cache

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: dict[str, np.ndarray],
             batch_index: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: returns the logits and the new cache (the retained state)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "position_ids": position_ids.astype(np.int64), **cache}
        if self.continuous:
            if batch_index is None:
                batch_index = np.arange(input_ids.shape[0], dtype=np.int64).reshape(-1, 1)
            feeds["batch_index"] = batch_index.astype(np.int64).reshape(-1, 1)
        out = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        new_cache = {n: out[f"{n}_RetainedState"] for n in self.past_names}
        return out["logits"], new_cache

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, chunk: int = 4,
                 cache: dict[str, np.ndarray] | None = None, rows: Sequence[int] | None = None) -> Generation:
        """Greedy generation for a batch of prompts (right-padded, chunked prefill)."""
        if self.static_seq is not None:
            chunk = self.static_seq
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise QeffError("every prompt needs at least one token")
        longest = max(lengths) + max_new_tokens - 1
        if max(lengths) > self.ctx_len:
            raise QeffError(f"a prompt of {max(lengths)} tokens does not fit the cache (ctx_len {self.ctx_len})",
                            "use a shorter prompt or a model built with a larger ctx_len")
        if longest > self.ctx_len:
            raise QeffError(f"{max(lengths)} prompt tokens + {max_new_tokens} new tokens do not fit ctx_len {self.ctx_len}",
                            "generate fewer tokens or use a larger ctx_len")
        b = len(prompts)
        if rows is not None and not self.continuous:
            raise QeffError("rows need a model with continuous batching (batch_index)")
        batch_index = None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1, 1)
        if cache is None:
            cache = self.new_cache(b if rows is None else max(rows) + 1)

        # Prefill: the logits of each row come from the chunk that holds its last token.
        n_chunks = math.ceil(max(lengths) / chunk)
        first_logits: list[np.ndarray | None] = [None] * b
        prefill_seconds = decode_seconds = 0.0
        for c in range(n_chunks):
            ids = np.zeros((b, chunk), dtype=np.int64)
            pos = np.full((b, chunk), -1, dtype=np.int64)
            for r, p in enumerate(prompts):
                part = list(p[c * chunk:(c + 1) * chunk])
                ids[r, :len(part)] = part
                pos[r, :len(part)] = np.arange(c * chunk, c * chunk + len(part))
            started = time.perf_counter()
            logits, cache = self.step(ids, pos, cache, batch_index)
            prefill_seconds += time.perf_counter() - started
            for r, n in enumerate(lengths):
                if c * chunk < n <= (c + 1) * chunk:
                    at = n - 1 - c * chunk if logits.shape[1] > 1 else 0  # logits=all keeps every token
                    first_logits[r] = logits[r, at].copy()
        after_prefill = {k: v.copy() for k, v in cache.items()}

        tokens = [[int(np.argmax(first_logits[r]))] for r in range(b)]
        all_logits = [[first_logits[r]] for r in range(b)]
        decode_len = 1 if self.static_seq is None else self.static_seq
        for step in range(1, max_new_tokens):
            ids = np.zeros((b, decode_len), dtype=np.int64)
            pos = np.full((b, decode_len), -1, dtype=np.int64)
            for r in range(b):
                ids[r, 0] = tokens[r][-1]
                pos[r, 0] = lengths[r] + step - 1
            started = time.perf_counter()
            logits, cache = self.step(ids, pos, cache, batch_index)
            decode_seconds += time.perf_counter() - started
            for r in range(b):
                row = logits[r, 0]
                all_logits[r].append(row.copy())
                tokens[r].append(int(np.argmax(row)))
        return Generation(tokens, all_logits, after_prefill, cache, n_chunks, prefill_seconds, decode_seconds)


def greedy_reference(model: str | os.PathLike | bytes, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int) -> Generation:
    """Greedy generation with a no-cache graph, recomputing the whole sequence at every step."""
    session = _session(model)
    names = {i.name for i in session.get_inputs()}
    out_name = next((o.name for o in session.get_outputs() if o.name == "logits"), session.get_outputs()[0].name)
    tokens, logits = [], []
    for prompt in prompts:
        seq = list(prompt)
        got_tokens, got_logits = [], []
        for _ in range(max_new_tokens):
            ids = np.asarray([seq], dtype=np.int64)
            feeds = {"input_ids": ids}
            if "attention_mask" in names:
                feeds["attention_mask"] = np.ones_like(ids)
            if "position_ids" in names:
                feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            row = session.run([out_name], feeds)[0][0, -1]
            got_logits.append(row.copy())
            got_tokens.append(int(np.argmax(row)))
            seq.append(got_tokens[-1])
        tokens.append(got_tokens)
        logits.append(got_logits)
    return Generation(tokens, logits, {})


def logits_differences(got: Generation, ref: Generation) -> list[list[float]]:
    """Per prompt, the max abs logits difference at each step up to and including the first
    step whose tokens disagree: after that the two continue from different sequences."""
    result = []
    for r in range(len(got.tokens)):
        diffs = []
        for s in range(min(len(got.tokens[r]), len(ref.tokens[r]))):
            diffs.append(float(np.max(np.abs(got.logits[r][s].astype(np.float64) - ref.logits[r][s]))))
            if got.tokens[r][s] != ref.tokens[r][s]:
                break
        result.append(diffs)
    return result


def _vocab_rows(path: str | os.PathLike) -> int:
    import onnx_ir as ir

    from qeff.passes.verify import _vocab_size

    model = ir.load(path)
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    return (_vocab_size(model.graph, ids) if ids is not None else None) or 100


def verify_kv_model(reference: str | os.PathLike, candidate: str | os.PathLike, *, ctx_len: int | None,
                    tolerance: float = 1e-4, prompt_lengths: Sequence[int] = (8, 5), max_new_tokens: int = 16,
                    seed: int = 0, fp16: bool = False) -> dict[str, Any]:
    """Greedy generation with the KV model against the original graph recomputing everything.

    With ``fp16`` the candidate is an fp16 simulation: it passes when its logits and cache stay
    finite, at least 90% of the greedy tokens agree (fp16 rounding may flip a near tie), and
    each step's logits differ by at most ``tolerance`` × the reference's largest logit.
    """
    runner = KVRunner(candidate, ctx_len)
    if runner.static_batch is not None:  # a model bound by fixed:batch_size=N takes N prompts
        prompt_lengths = [prompt_lengths[i % len(prompt_lengths)] for i in range(runner.static_batch)]
    room = runner.ctx_len - max(prompt_lengths) + 1
    if room < 2:
        prompt_lengths = [max(1, runner.ctx_len // 2), max(1, runner.ctx_len // 3)]
        room = runner.ctx_len - max(prompt_lengths) + 1
    steps = max(1, min(max_new_tokens, room))
    vocab = _vocab_rows(reference)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in prompt_lengths]
    got = runner.generate(prompts, steps)
    ref = greedy_reference(reference, prompts, steps)

    per_step = []
    agree = 0
    for r, diffs in enumerate(logits_differences(got, ref)):
        for s, diff in enumerate(diffs):
            same = got.tokens[r][s] == ref.tokens[r][s]
            per_step.append({"prompt": r, "step": s, "max_abs": diff, "token_match": same})
            agree += same
    worst = max((p["max_abs"] for p in per_step), default=0.0)
    expected = len(prompts) * steps
    passed = agree == expected and worst <= tolerance
    method = "greedy generation: KV model (chunked prefill, decode) vs the original graph recomputing the sequence"
    extra: dict[str, Any] = {}
    if fp16:
        from qeff.passes.verify import relative_difference

        for p in per_step:
            p["max_rel"] = relative_difference(p["max_abs"], ref.logits[p["prompt"]][p["step"]])
        finite = (all(np.isfinite(step).all() for row in got.logits for step in row)
                  and all(np.isfinite(v).all() for v in got.cache.values()))
        worst_rel = max((p["max_rel"] for p in per_step), default=0.0)
        passed = finite and agree >= math.ceil(0.9 * expected) and worst_rel <= tolerance
        extra = {"method": f"{method}; the KV model in fp16 simulation", "finite": bool(finite), "max_rel": worst_rel}
    return {
        "method": method,
        "prompts": [len(p) for p in prompts],
        "steps": steps,
        "ctx_len": runner.ctx_len,
        "token_agreement": f"{agree}/{expected}",
        "per_step": per_step,
        "max_abs": worst,
        "tolerance": tolerance,
        "passed": bool(passed),
        "reference": str(Path(reference)),
        **extra,
    }
