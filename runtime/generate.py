"""Text generation with any KV-cache Session (DESIGN §5).

- Prefill is chunked and right-padded: each prompt goes in chunks of ``prefill_len`` tokens,
  pads carry ``position_ids = -1`` (the model writes nothing for them and they see nothing).
- Decoding is greedy, or sampled (``temperature``, ``top_k``, ``top_p``, ``seed``); a row stops
  at ``eos_token_id`` or after ``max_new_tokens``; ``stream(row, token)`` sees every token as it
  is chosen.
- Several prompts run as one batch (all rows prefilled, then decoded together), or, for a model
  with continuous batching (a ``batch_index`` input), through ``full_batch_size`` cache rows:
  a queue of prompts larger than that is served slot by slot, each new prompt prefilled into the
  row a finished one left.
- Refused before the first call: a prefill length below 1 or above the cache's ``ctx_len``, a
  token id that is negative, beyond int64 or outside the vocabulary (when the model says how
  large it is), and a prompt or a generation that does not fit ``ctx_len``.
- Speculative decoding (``speculative=PromptLookup(k=3)`` or ``DraftModel(draft, k=3)``, greedy
  only, on a target rewritten with ``spec``): see :mod:`qeff.runtime.speculative`. The stats then
  also count target calls, proposed and accepted tokens.
- A model rewritten with ``ccl`` (a ``comp_ctx_lengths`` input) gets, at every call, the smallest
  compute context length above the largest position in the batch, so attention reads no more
  of the cache than the positions need.
- Stats: time to first token (the first prefill), decode tokens/s, total tokens/s, end-to-end.
"""

from __future__ import annotations

__all__ = ["GenerationResult", "GenerationStats", "generate", "Sampler", "context_length", "vocab_size",
           "prefill_length", "full_batch_size", "compute_context_lengths", "pick_ccl"]

import collections
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from qeff.contract import (BATCH_INDEX, COMP_CTX_LENGTHS, CTX_LEN, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP,
                           POSITION_IDS, SEQ_LEN)
from qeff.errors import QeffError
from qeff.runtime.session import Session

if TYPE_CHECKING:  # pragma: no cover
    from qeff.runtime.speculative import Proposer


@dataclasses.dataclass
class GenerationStats:
    ttft_s: float = 0.0  # the first prompt's prefill, until its first token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens from decode steps (the first token of each prompt comes from prefill)
    target_calls: int = 0  # decode calls of the model (speculative: each checks a row's proposals)
    proposed_tokens: int = 0  # speculative: proposals sent to the target
    accepted_tokens: int = 0  # speculative: proposals the target agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.decode_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return self.generated_tokens / self.e2e_s if self.e2e_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s, "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_call": self.tokens_per_target_call}


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per prompt, in prompt order
    stats: GenerationStats
    finished_by_eos: list[bool]
    # With keep_logits: per prompt, the logits row each token was chosen from (step 0 = prefill).
    logits: list[list[np.ndarray]] | None = None


def _number(value: object, what: str, example: str) -> float:
    """``value`` as a float; a QeffError naming ``what`` when it is not a real number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise QeffError(f"{what}={value!r} is not a number", example)


def _integer(value: object, what: str, example: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise QeffError(f"{what}={value!r} is not a whole number", example)


class Sampler:
    """Greedy when ``temperature`` is 0, else softmax sampling with top-k and top-p filtering."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> None:
        example = "e.g. temperature=0.8, top_k=50, top_p=0.95"
        temperature = _number(temperature, "temperature", example)
        top_p = _number(top_p, "top_p", example)
        top_k = _integer(top_k, "top_k", example)
        # NaN compares false with everything, so each bound is written to fail on it.
        if not (math.isfinite(temperature) and temperature >= 0):
            raise QeffError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)", example)
        if not 0 < top_p <= 1:
            raise QeffError(f"top_p={top_p} must be above 0 and at most 1", example)
        if top_k < 0:
            raise QeffError(f"top_k={top_k} must be >= 0 (0 keeps every token)", example)
        if seed is not None:
            seed = _integer(seed, "seed", "give a whole number >= 0, or no seed")
            if seed < 0:  # numpy refuses negative seeds with its own error
                raise QeffError(f"seed={seed} is negative", "give a whole number >= 0, or no seed")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < scores.size:
            cut = np.partition(scores, -self.top_k)[-self.top_k]
            scores = np.where(scores < cut, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            keep = np.cumsum(probs[order]) - probs[order] < self.top_p  # the smallest set reaching top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def _static_dim(session: Session, name: str, axis: int) -> int | None:
    dims = session.spec(name).shape
    return dims[axis] if len(dims) > axis and isinstance(dims[axis], int) else None


def prefill_length(session: Session, requested: int | None, ctx: int | None) -> int:
    """The prefill chunk: the model's fixed sequence length, the one requested, the compiled
    one, else 32 (at most ``ctx``). Refused when it is below 1 or above the cache's ``ctx``."""
    if requested is not None:
        requested = _integer(requested, "prefill_len", "e.g. prefill_len=32")
        if requested < 1:
            raise QeffError(f"prefill length {requested} must be at least 1", "e.g. prefill_len=32, or leave it out")
    static = _static_dim(session, INPUT_IDS, 1)
    if static is not None:  # a model bound to one sequence length takes every call at it
        if requested is not None and requested != static:
            raise QeffError(f"the model's sequence length is fixed at {static}; prefill_len={requested} cannot feed it",
                            f"use prefill_len={static} or leave it out")
        chunk = static
    elif requested is not None:
        chunk = requested
    else:
        lengths = [s.get(SEQ_LEN) for s in session.specializations if s.get(SEQ_LEN)]
        chunk = max(lengths) if lengths else (min(32, ctx) if ctx else 32)
    # A chunk wider than the cache cannot be filled by one prompt (prompts are refused above
    # ctx_len), and its pads would share slots with the valid tokens.
    if ctx is not None and chunk > ctx:
        raise QeffError(f"prefill length {chunk} is above ctx_len {ctx}",
                        f"use a prefill length of at most {ctx}, or a model built with a larger ctx_len")
    return chunk


def context_length(session: Session) -> int | None:
    """How many positions the session's cache holds, when it is known."""
    size = getattr(session, "ctx_len", None)
    if size:
        return int(size)
    cache = next(iter(session.retained), None)
    if cache is not None and _static_dim(session, cache, 2) is not None:
        return _static_dim(session, cache, 2)
    sizes = [s.get(CTX_LEN) for s in session.specializations if s.get(CTX_LEN)]
    return max(sizes) if sizes else None


def vocab_size(session: Session) -> int | None:
    """The number of token ids the model takes, when it is known: the session's
    ``vocab_size``, else the static last dim of the logits output."""
    size = getattr(session, "vocab_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0:
        return int(size)
    if LOGITS not in {o.name for o in session.outputs}:
        return None
    dims = session.spec(LOGITS).shape
    return dims[-1] if dims and isinstance(dims[-1], int) and dims[-1] > 0 else None


_INT64_MAX = int(np.iinfo(np.int64).max)


def _check_token_ids(prompts: Sequence[Sequence[int]], vocab: int | None) -> None:
    """Every prompt token is an integer id the model has; the error names the first bad one."""
    top = vocab - 1 if vocab else _INT64_MAX
    for index, prompt in enumerate(prompts):
        for place, token in enumerate(prompt):
            if not isinstance(token, numbers.Integral) or isinstance(token, bool):
                raise QeffError(f"prompt {index} has {token!r} at position {place}, which is not a token id",
                                "token ids are whole numbers")
            if not 0 <= token <= top:
                if token < 0:
                    why = "token ids are >= 0"
                elif vocab and token >= vocab:
                    why = f"the model's vocabulary has {vocab} ids (0..{vocab - 1})"
                else:
                    why = "it does not fit in int64"
                raise QeffError(f"prompt {index} has token id {int(token)} at position {place}: {why}",
                                "check the ids, or the tokenizer that produced them")


def _check_fits(session: Session, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                ctx: int | None = None) -> None:
    ctx = context_length(session) if ctx is None else ctx
    if ctx is None:
        return
    longest = max(len(p) for p in prompts)
    if longest > ctx:
        raise QeffError(f"a prompt of {longest} tokens does not fit the cache (ctx_len {ctx})",
                        "use a shorter prompt or a model built with a larger ctx_len")
    if longest + max_new_tokens - 1 > ctx:
        raise QeffError(f"{longest} prompt tokens + {max_new_tokens} new tokens do not fit ctx_len {ctx}",
                        "generate fewer tokens or use a larger ctx_len")


def generate(session: Session, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             prefill_len: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[int, int], None] | None = None, reset: bool = True,
             keep_logits: bool = False, speculative: Proposer | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt (see the module docstring)."""
    # Everything a caller can get wrong is refused here, before the first call to the model.
    if not prompts or any(len(p) == 0 for p in prompts):
        raise QeffError("generate needs at least one prompt, each with at least one token")
    max_new_tokens = _integer(max_new_tokens, "max_new_tokens", "e.g. max_new_tokens=32")
    if max_new_tokens < 1:
        raise QeffError(f"max_new_tokens={max_new_tokens} must be at least 1", "e.g. max_new_tokens=32")
    names = set(session.input_names)
    if not {INPUT_IDS, POSITION_IDS} <= names or not session.retained:
        raise QeffError("generate needs a KV-cache model (input_ids, position_ids, past_* inputs)",
                        "rewrite the model with qeff-opt --passes kv")
    _check_token_ids(prompts, vocab_size(session))
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    sampler = Sampler(temperature, top_k, top_p, seed)
    ctx = context_length(session)
    chunk = prefill_length(session, prefill_len, ctx)
    _check_fits(session, prompts, max_new_tokens, ctx)
    if speculative is not None:
        _check_speculative(session, speculative, temperature, prompts)
    if reset:
        session.reset()
    run = _Runner(session, chunk, sampler, eos, max_new_tokens, stream, keep_logits)
    start = time.perf_counter()
    if speculative is not None:
        run.speculative(prompts, speculative)
    elif BATCH_INDEX in names:
        run.continuous(prompts)
    else:
        run.batch(prompts)
    run.stats.e2e_s = time.perf_counter() - start
    run.stats.prompt_tokens = sum(len(p) for p in prompts)
    run.stats.generated_tokens = sum(len(t) for t in run.tokens)
    return GenerationResult(run.tokens, run.stats, run.finished, run.logits if keep_logits else None)


def _check_speculative(session: Session, proposer: Proposer, temperature: float,
                       prompts: Sequence[Sequence[int]]) -> None:
    if NUM_LOGITS_TO_KEEP not in session.input_names:
        raise QeffError("speculative decoding needs a target that returns several logits rows",
                        "rewrite the model with qeff-opt --passes kv,spec")
    if temperature:
        raise QeffError("speculative decoding accepts proposals greedily; temperature must be 0",
                        "drop the sampling options, or decode without speculative=")
    if BATCH_INDEX in session.input_names:
        raise QeffError("speculative decoding runs batches of prompts, not continuous batching",
                        "rewrite the target without continuous_batching")
    static = _static_dim(session, INPUT_IDS, 1)
    if static is not None and static != proposer.k + 1:
        raise QeffError(f"the target's sequence length is fixed at {static}, a step of k={proposer.k} needs "
                        f"{proposer.k + 1}", f"use k={static - 1}")
    draft = getattr(proposer, "session", None)
    if draft is not None:
        if BATCH_INDEX in draft.input_names:
            raise QeffError("the draft model has continuous batching", "rewrite the draft without it")
        a, b = vocab_size(session), vocab_size(draft)
        if a and b and a != b:
            raise QeffError(f"the draft's vocabulary ({b}) is not the target's ({a})",
                            "use a draft model with the target's tokenizer")
        _check_fits(draft, prompts, 1)


def compute_context_lengths(session: Session) -> dict[str, list[int]] | None:
    """``{"prefill": [...], "decode": [...]}`` for a model with a ``comp_ctx_lengths`` input:
    the session's own (``ccl``, from the manifest), else every value its specializations set."""
    if COMP_CTX_LENGTHS not in session.input_names:
        return None
    lists = getattr(session, "ccl", None)
    if lists:
        return {phase: sorted(int(c) for c in lists[phase]) for phase in ("prefill", "decode")}
    values = sorted({int(s[COMP_CTX_LENGTHS]) for s in session.specializations if s.get(COMP_CTX_LENGTHS)})
    ctx = context_length(session)
    values = values or ([ctx] if ctx else [])
    if not values:
        raise QeffError("the model reads comp_ctx_lengths but no compute context length is known",
                        "run it with the manifest ccl wrote beside it")
    return {"prefill": values, "decode": values}


def pick_ccl(lengths: Sequence[int], positions: np.ndarray) -> int:
    """The smallest compute context length above every position of the call (the last one
    when none is: the cache's own length)."""
    top = int(positions.max(initial=-1))
    return next((c for c in lengths if c > top), lengths[-1])


class _Runner:
    def __init__(self, session: Session, chunk: int, sampler: Sampler, eos: set[int], max_new: int,
                 stream: Callable[[int, int], None] | None, keep_logits: bool = False) -> None:
        self.session, self.chunk, self.sampler, self.eos, self.max_new, self.stream = \
            session, chunk, sampler, eos, max_new, stream
        self.keep_logits = keep_logits
        # A model bound to one sequence length decodes at it too: one token and pads.
        self.decode_len = _static_dim(session, INPUT_IDS, 1) or 1
        self.stats = GenerationStats()
        self.tokens: list[list[int]] = []
        self.logits: list[list[np.ndarray]] = []
        self.finished: list[bool] = []
        self.keeps_logits_rows = NUM_LOGITS_TO_KEEP in session.input_names
        self.ccl = compute_context_lengths(session)

    def _start(self, prompts: int) -> None:
        self.tokens, self.finished = [[] for _ in range(prompts)], [False] * prompts
        self.logits = [[] for _ in range(prompts)]

    def _decode_feeds(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((rows, self.decode_len), np.int64), np.full((rows, self.decode_len), -1, np.int64)

    def _emit(self, prompt: int, token: int) -> bool:
        """Record a token; True when that prompt is done."""
        self.tokens[prompt].append(token)
        if self.stream is not None:
            self.stream(prompt, token)
        if token in self.eos:
            self.finished[prompt] = True
            return True
        return len(self.tokens[prompt]) >= self.max_new

    def _call(self, ids: np.ndarray, pos: np.ndarray, batch_index: np.ndarray | None = None,
              rows: int = 1, prefill: bool = False) -> np.ndarray:
        """One call; ``rows`` logits rows per sequence from a ``spec`` model (1 otherwise)."""
        feeds = {INPUT_IDS: ids, POSITION_IDS: pos}
        if batch_index is not None:
            feeds[BATCH_INDEX] = batch_index
        if self.keeps_logits_rows:
            feeds[NUM_LOGITS_TO_KEEP] = np.zeros((rows, 1), np.int64)
        if self.ccl is not None:
            lengths = self.ccl["prefill" if prefill else "decode"]
            feeds[COMP_CTX_LENGTHS] = np.zeros(pick_ccl(lengths, pos), np.int64)
        return self.session.run(feeds)[LOGITS]

    def _pick(self, logits: np.ndarray, row: int, index: int, prompt: int) -> int:
        """Choose prompt ``prompt``'s next token from ``logits[row]`` (at ``index`` when the
        model returns every position's logits)."""
        scores = logits[row, 0 if logits.shape[1] == 1 else index]
        if self.keep_logits:
            self.logits[prompt].append(scores.copy())
        return self.sampler(scores)

    def _prefill(self, prompts: list[Sequence[int]], batch_index: np.ndarray | None = None,
                 owners: Sequence[int] | None = None) -> list[int]:
        """Chunked prefill of ``prompts`` as one batch; returns each row's first token.
        ``owners[r]`` is the prompt index row ``r`` serves (default: the row itself)."""
        owners = list(range(len(prompts))) if owners is None else list(owners)
        b, longest = len(prompts), max(len(p) for p in prompts)
        first: list[int | None] = [None] * b
        for c in range(math.ceil(longest / self.chunk)):
            ids = np.zeros((b, self.chunk), np.int64)
            pos = np.full((b, self.chunk), -1, np.int64)
            for r, p in enumerate(prompts):
                part = list(p[c * self.chunk:(c + 1) * self.chunk])
                ids[r, :len(part)] = part
                pos[r, :len(part)] = np.arange(c * self.chunk, c * self.chunk + len(part))
            logits = self._call(ids, pos, batch_index, prefill=True)
            for r, p in enumerate(prompts):
                if c * self.chunk < len(p) <= (c + 1) * self.chunk:
                    first[r] = self._pick(logits, r, len(p) - 1 - c * self.chunk, owners[r])
        return [int(t) for t in first]

    def batch(self, prompts: Sequence[Sequence[int]]) -> None:
        b = len(prompts)
        self._start(b)
        started = time.perf_counter()
        first = self._prefill(list(prompts))
        self.stats.prefill_s = self.stats.ttft_s = time.perf_counter() - started
        done = [self._emit(r, first[r]) for r in range(b)]
        positions = [len(p) for p in prompts]
        started = time.perf_counter()
        while not all(done):
            ids, pos = self._decode_feeds(b)  # finished rows are pads: they change nothing
            for r in range(b):
                if not done[r]:
                    ids[r, 0], pos[r, 0] = self.tokens[r][-1], positions[r]
                    positions[r] += 1
            logits = self._call(ids, pos)
            self.stats.target_calls += 1
            for r in range(b):
                if not done[r]:
                    done[r] = self._emit(r, self._pick(logits, r, 0, r))
                    self.stats.decode_tokens += 1
        self.stats.decode_s = time.perf_counter() - started

    def speculative(self, prompts: Sequence[Sequence[int]], proposer: Proposer) -> None:
        """Greedy speculative decoding (:mod:`qeff.runtime.speculative`)."""
        b, k = len(prompts), proposer.k
        ctx = context_length(self.session) or math.inf
        self._start(b)
        proposer.start(b)
        started = time.perf_counter()
        first = self._prefill(list(prompts))
        self.stats.prefill_s = self.stats.ttft_s = time.perf_counter() - started
        done = [self._emit(r, first[r]) for r in range(b)]
        texts = [list(p) + [first[r]] for r, p in enumerate(prompts)]
        started = time.perf_counter()
        while not all(done):
            active = [r for r in range(b) if not done[r]]
            # Room for proposals: no position past the cache, no more tokens than asked for.
            limits = {r: int(max(0, min(k, ctx - len(texts[r]), self.max_new - len(self.tokens[r]) - 1)))
                      for r in active}
            proposals = proposer.propose({r: texts[r] for r in active}, limits)
            ids = np.full((b, k + 1), -1, np.int64)
            pos = np.full((b, k + 1), -1, np.int64)
            for r in active:
                p = list(proposals.get(r, []))[:limits[r]]
                proposals[r] = p
                n = len(texts[r]) - 1
                ids[r, :len(p) + 1] = [texts[r][-1], *p]
                pos[r, :len(p) + 1] = np.arange(n, n + len(p) + 1)
            logits = self._call(ids, pos, rows=k + 1)
            self.stats.target_calls += 1
            for r in active:
                p = proposals[r]
                accepted = 0
                for i in range(len(p) + 1):
                    token = self._pick(logits, r, i, r)
                    texts[r].append(token)
                    self.stats.decode_tokens += 1
                    done[r] = self._emit(r, token)
                    if done[r] or i == len(p) or token != p[i]:
                        break
                    accepted += 1
                self.stats.proposed_tokens += len(p)
                self.stats.accepted_tokens += accepted
                proposer.accepted(r, len(texts[r]), len(p), accepted)
        self.stats.decode_s = time.perf_counter() - started

    def continuous(self, prompts: Sequence[Sequence[int]]) -> None:
        """Continuous batching: ``full_batch_size`` cache rows serve a queue of prompts."""
        slots = full_batch_size(self.session)
        self._start(len(prompts))
        queue = collections.deque(range(len(prompts)))
        active: dict[int, int] = {}  # slot -> prompt
        position: dict[int, int] = {}
        started_all = time.perf_counter()

        def admit(slot: int) -> None:
            while queue:
                prompt = queue.popleft()
                t0 = time.perf_counter()
                token = self._prefill([prompts[prompt]], np.array([[slot]], np.int64), [prompt])[0]
                self.stats.prefill_s += time.perf_counter() - t0
                if not self.stats.ttft_s:
                    self.stats.ttft_s = time.perf_counter() - started_all
                if not self._emit(prompt, token):
                    active[slot], position[slot] = prompt, len(prompts[prompt])
                    return

        for slot in range(slots):
            admit(slot)
        while active:
            ids, pos = self._decode_feeds(slots)
            for slot, prompt in active.items():
                ids[slot, 0], pos[slot, 0] = self.tokens[prompt][-1], position[slot]
            t0 = time.perf_counter()
            logits = self._call(ids, pos, np.arange(slots, dtype=np.int64).reshape(-1, 1))
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.target_calls += 1
            for slot, prompt in list(active.items()):
                position[slot] += 1
                self.stats.decode_tokens += 1
                if self._emit(prompt, self._pick(logits, slot, 0, prompt)):
                    del active[slot]
                    admit(slot)


def full_batch_size(session: Session) -> int:
    sizes = [s.get("full_batch_size") for s in session.specializations if s.get("full_batch_size")]
    size = max(sizes) if sizes else getattr(session, "full_batch_size", None)
    if not size:
        spec = session.spec(next(iter(session.retained)))
        size = spec.shape[0] if isinstance(spec.shape[0], int) else None
    if not size:
        raise QeffError("the model has continuous batching but its full batch size is unknown",
                        "pass full_batch_size= to the session")
    return int(size)
