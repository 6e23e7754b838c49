"""The tests drive KV models the way a serving loop does: through the runtime (``OrtSession``
+ ``generate``), with the cache kept in the session between calls."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qeff.runtime import GenerationResult, OrtSession, generate


def kv_generate(model, prompts: Sequence[Sequence[int]], new_tokens: int, *, ctx_len: int | None = None,
                chunk: int = 4, prefill_cache: bool = False, session: OrtSession | None = None,
                reset: bool = True) -> GenerationResult:
    """Greedy generation with every step's logits; ``result.cache`` is the state after the last
    step and, with ``prefill_cache``, ``result.cache_after_prefill`` the state after prefill."""
    session = session or OrtSession(model, ctx_len=ctx_len)
    seq = session.spec("input_ids").shape[1]
    chunk = seq if isinstance(seq, int) else chunk
    after_prefill = None
    if prefill_cache:
        generate(session, prompts, 1, prefill_len=chunk, reset=reset)
        after_prefill = session.state()
    result = generate(session, prompts, new_tokens, prefill_len=chunk, keep_logits=True, reset=reset)
    result.cache = session.state()
    result.cache_after_prefill = after_prefill
    return result


def kv_step(session: OrtSession, input_ids, position_ids, cache: dict[str, np.ndarray] | None = None,
            batch_index=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call with the given cache (or the session's own): (logits, the cache it left)."""
    feeds = {"input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64)}
    if batch_index is not None:
        feeds["batch_index"] = np.asarray(batch_index, np.int64).reshape(-1, 1)
    feeds.update(cache or {})
    logits = session.run(feeds)["logits"]
    return logits, session.state()


def zero_cache(session: OrtSession, rows: int) -> dict[str, np.ndarray]:
    """A zero cache of ``rows`` rows for every state input of ``session``."""
    cache = {}
    for name in session.retained:
        spec = session.spec(name)
        shape = [rows if i == 0 else (d if isinstance(d, int) else session.ctx_len) for i, d in enumerate(spec.shape)]
        cache[name] = np.zeros(shape, spec.dtype)
    return cache


# Two right-padded prompts, the longer one crossing every tiny window and three prefill chunks.
CROSSING_PROMPTS = [[5, 9, 3, 7, 11, 2, 8, 6, 4, 10], [12, 13, 14]]


def assert_generates_like_hf(model, kv_path, ctx_len: int, prompts: Sequence[Sequence[int]] = CROSSING_PROMPTS,
                             new_tokens: int = 12) -> None:
    """The KV model's greedy tokens equal Hugging Face ``generate``'s on each prompt (run alone,
    unpadded), and every step's logits agree within 1e-4."""
    import torch

    got = kv_generate(str(kv_path), prompts, new_tokens, ctx_len=ctx_len)
    for r, prompt in enumerate(prompts):
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        assert got.tokens[r] == hf.sequences[0, len(prompt):].tolist(), r
        for a, b in zip(got.logits[r], hf.logits):
            np.testing.assert_allclose(a, b[0].numpy(), atol=1e-4, rtol=0)
