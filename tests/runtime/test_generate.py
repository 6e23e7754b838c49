"""OrtSession + generate against Hugging Face generate (PyTorch, same weights, greedy, with
cache): every tiny architecture, batch 2 with padding, continuous batching with 5 prompts over
2 slots; the cache stays in bound OrtValues; sampling checked against its definition."""

from __future__ import annotations

import numpy as np
import pytest

from qeff.errors import QeffError
from qeff.optimizer import optimize
from qeff.runtime import OrtSession, Sampler, generate
from tests.passes.test_kv import ARCHS

CTX = 48
PROMPTS = [[5, 9, 3, 7, 1, 4, 2, 8, 6], [6, 3], [11, 12, 13], [1], [7, 7, 7, 7, 7]]
NEW = 12


def _hf_tokens(arch: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Hugging Face greedy generation, one prompt at a time (no padding involved)."""
    torch = pytest.importorskip("torch")
    from qeff.frontend import build_tiny_model

    model = build_tiny_model(arch, seed=0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, use_cache=True)
            out.append(generated[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_with_padding_matches_hugging_face(tiny_export, tmp_path, arch):
    model = optimize(tiny_export(arch), f"kv:ctx_len={CTX}", output=tmp_path / "kv.onnx").output
    session = OrtSession(model)
    result = generate(session, PROMPTS[:2], NEW, prefill_len=4)
    assert result.tokens == _hf_tokens(arch, PROMPTS[:2], NEW)
    assert session.kv_bytes_copied == 0
    assert result.stats.generated_tokens == 2 * NEW and result.stats.decode_tokens == 2 * (NEW - 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mpt", "phi3"])
def test_continuous_batching_five_prompts_over_two_slots(tiny_export, tmp_path, arch):
    model = optimize(tiny_export(arch), f"kv:ctx_len={CTX},continuous_batching=true,full_batch_size=2",
                     output=tmp_path / "cb.onnx").output
    seen: list[tuple[int, int]] = []
    result = generate(OrtSession(model), PROMPTS, NEW, prefill_len=4, stream=lambda p, t: seen.append((p, t)))
    assert result.tokens == _hf_tokens(arch, PROMPTS, NEW)
    for prompt in range(len(PROMPTS)):  # the stream saw each prompt's tokens in order
        assert [t for p, t in seen if p == prompt] == result.tokens[prompt]


def test_cache_stays_in_bound_ortvalues(tiny_export, tmp_path):
    """The two OrtValue sets are allocated once and only swap; state() and passing past_* are
    the only copies; reset zeroes the cache."""
    model = optimize(tiny_export("llama"), f"kv:ctx_len={CTX}", output=tmp_path / "kv.onnx").output
    session = OrtSession(model)
    generate(session, PROMPTS[:1], 4)
    before = _cache_pointers(session)
    generate(session, PROMPTS[:1], 6, reset=False)
    after = _cache_pointers(session)
    assert after == before
    assert session.kv_bytes_copied == 0
    cache = session.state()
    assert session.kv_bytes_copied == sum(a.nbytes for a in cache.values()) and any(a.any() for a in cache.values())
    session.reset()
    assert not any(a.any() for a in session.state().values())
    # Passing the cache back in replaces the state: the continuation equals an uninterrupted run.
    whole = generate(session, [PROMPTS[0]], 8).tokens[0]
    session.reset()
    generate(session, [PROMPTS[0]], 4, reset=False)
    saved = session.state()
    session.reset()
    session.run({"input_ids": np.array([[0]]), "position_ids": np.array([[-1]]), **saved})
    logits = session.run({"input_ids": np.array([[whole[3]]]), "position_ids": np.array([[len(PROMPTS[0]) + 3]])})
    assert int(np.argmax(logits["logits"][0, -1])) == whole[4]


def _cache_pointers(session: OrtSession) -> list[int]:
    return sorted(v.data_ptr() for v in (*session._state.values(), *session._spare.values()))


def test_eos_stops_a_row_and_bad_input_is_refused(tiny_export, tmp_path):
    model = optimize(tiny_export("llama"), f"kv:ctx_len={CTX}", output=tmp_path / "kv.onnx").output
    session = OrtSession(model)
    full = generate(session, PROMPTS[:2], NEW).tokens
    eos = full[0][3]
    stopped = generate(session, PROMPTS[:2], NEW, eos_token_id=eos)
    assert stopped.tokens[0] == full[0][:4] and stopped.finished_by_eos[0]
    assert stopped.tokens[1] == full[1][:full[1].index(eos) + 1] if eos in full[1] else stopped.tokens[1] == full[1]
    with pytest.raises(QeffError, match="int64"):
        session.run({"input_ids": np.zeros((1, 1), np.int32), "position_ids": np.zeros((1, 1), np.int64)})
    with pytest.raises(QeffError, match="no input 'tokens'"):
        session.run({"tokens": np.zeros((1, 1), np.int64)})
    session.close()
    with pytest.raises(QeffError, match="closed"):
        session.run({"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64)})


def test_sampler_follows_top_k_and_top_p():
    """Empirical frequencies against the filtered, renormalised softmax computed here."""
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    draws = 20000
    for top_k, top_p, expected in [
        (0, 1.0, [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]),
        (3, 1.0, np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8),
        (0, 0.7, np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8),  # the smallest set reaching 0.7
        (2, 0.5, [1, 0, 0, 0, 0, 0]),  # top-k first: 0.4/0.65 alone reaches 0.5
    ]:
        sampler = Sampler(temperature=1.0, top_k=top_k, top_p=top_p, seed=0)
        counts = np.bincount([sampler(logits) for _ in range(draws)], minlength=6) / draws
        np.testing.assert_allclose(counts, expected, atol=0.015)
    assert Sampler(seed=1)(logits) == 0  # temperature 0: greedy
    first = [Sampler(temperature=0.7, seed=5)(logits) for _ in range(3)]
    assert first == [Sampler(temperature=0.7, seed=5)(logits) for _ in range(3)]  # seeded


def test_simulations_run_through_the_session(tiny_export, tmp_path):
    """The mxint8kv and fp16 simulations are ordinary graphs: they generate through OrtSession."""
    from qeff.passes.fp16.simulation import simulate_fp16

    model = optimize(tiny_export("llama"), f"kv:ctx_len={CTX},mxint8kv,fp16clip", output=tmp_path / "m.onnx").output
    tokens = generate(OrtSession(simulate_fp16(model).SerializeToString(), ctx_len=CTX), PROMPTS[:2], 8).tokens
    assert [len(t) for t in tokens] == [8, 8]
