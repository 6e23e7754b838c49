"""Pads at the boundary of the cache: one call whose valid tokens fill every slot, plus pads.

With ``ctx_len`` 8 a 9-wide chunk carries 8 valid tokens (positions 0..7) and one pad. Every
slot is then written by a valid token, so whatever a pad writes lands on a slot a valid token
writes too; the result must not depend on the order the scatter applies them in. The logits
and the retained cache are compared with Hugging Face's forward pass on the 8 tokens (an
independent computation), and with the same call without the pad."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from qeff.optimizer import optimize
from qeff.runtime import OrtSession
from tests.kv_drive import kv_step, zero_cache

CTX = 8
PROMPT = [17, 301, 5, 88, 412, 9, 250, 33]  # fills every slot of the cache


@functools.lru_cache(maxsize=None)
def _hf(arch: str, prompt: tuple[int, ...]):
    """Hugging Face's last-token logits and per-layer (K, V) [n_kv, len, d] for ``prompt``."""
    torch = pytest.importorskip("torch")
    from qeff.frontend import build_tiny_model

    model = build_tiny_model(arch, seed=0, attn_implementation="eager").eval()
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = [(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in out.past_key_values.layers]
    return out.logits[0, -1].float().numpy(), cache


@pytest.fixture(scope="module")
def kv_model(tiny_export, tmp_path_factory):
    """``kv_model(arch="llama", extra="") -> path``: the kv model with ctx_len 8, built once."""
    built: dict[tuple[str, str], str] = {}

    def factory(arch: str = "llama", extra: str = "") -> str:
        if (arch, extra) not in built:
            out = tmp_path_factory.mktemp(f"kv-pad-{arch}") / "kv.onnx"
            optimize(tiny_export(arch), f"kv:ctx_len={CTX}{extra}", output=out)
            built[arch, extra] = str(out)
        return built[arch, extra]

    return factory


def _random_cache(session: OrtSession, rows: int, seed: int = 3) -> dict[str, np.ndarray]:
    cache = zero_cache(session, rows)
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(a.shape).astype(a.dtype) for name, a in cache.items()}


def _check_row(logits: np.ndarray, cache: dict[str, np.ndarray], row: int, arch: str) -> None:
    ref_logits, ref_cache = _hf(arch, tuple(PROMPT))
    np.testing.assert_allclose(logits[row, -1], ref_logits, atol=1e-4, rtol=0)
    for i, (k, v) in enumerate(ref_cache):
        np.testing.assert_allclose(cache[f"past_key.{i}"][row], k, atol=1e-4, rtol=0, err_msg=f"key {i}")
        np.testing.assert_allclose(cache[f"past_value.{i}"][row], v, atol=1e-4, rtol=0, err_msg=f"value {i}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pads_at", ["end", "start", "middle"])
def test_full_cache_chunk_with_a_pad_equals_the_chunk_without(kv_model, arch, pads_at):
    session = OrtSession(kv_model(arch), ctx_len=CTX)
    ids, pos = list(PROMPT), list(range(CTX))
    at = {"end": CTX, "start": 0, "middle": 3}[pads_at]
    ids.insert(at, 0)
    pos.insert(at, -1)
    # A dirty cache: slot 0's old value must not survive anywhere a valid token wrote.
    dirty = _random_cache(session, 1)
    padded_logits, padded = kv_step(session, [ids], [pos], dirty)
    plain_logits, plain = kv_step(session, [PROMPT], [list(range(CTX))], dirty)
    _check_row(padded_logits, padded, 0, arch)
    _check_row(plain_logits, plain, 0, arch)
    np.testing.assert_allclose(padded_logits, plain_logits, atol=1e-5, rtol=0)
    for name in plain:
        np.testing.assert_allclose(padded[name], plain[name], atol=1e-6, rtol=0, err_msg=name)


def test_several_pads_and_an_all_pad_row(kv_model):
    """Row 0: the full prompt and two pads; row 1: pads only, over a dirty cache it must keep."""
    session = OrtSession(kv_model(), ctx_len=CTX)
    dirty = _random_cache(session, 2)
    ids = [PROMPT + [0, 0], [0] * (CTX + 2)]
    pos = [list(range(CTX)) + [-1, -1], [-1] * (CTX + 2)]
    logits, cache = kv_step(session, ids, pos, dirty)
    _check_row(logits, cache, 0, "llama")
    assert np.isfinite(logits[1]).all()
    for name in cache:
        np.testing.assert_array_equal(cache[name][1], dirty[name][1], err_msg=name)


def test_all_pads_change_nothing(kv_model):
    session = OrtSession(kv_model(), ctx_len=CTX)
    dirty = _random_cache(session, 3, seed=11)
    _, cache = kv_step(session, np.zeros((3, 5)), np.full((3, 5), -1), dirty)
    for name in cache:
        np.testing.assert_array_equal(cache[name], dirty[name], err_msg=name)


def test_partial_rows_write_only_their_positions(kv_model):
    """Pads beside a partly filled row leave every slot the row's valid tokens do not reach."""
    session = OrtSession(kv_model(), ctx_len=CTX)
    dirty = _random_cache(session, 2, seed=5)
    ids = [[4, 5, 6, 0, 0], [7, 0, 0, 0, 0]]
    pos = [[5, 6, 7, -1, -1], [2, -1, -1, -1, -1]]
    _, cache = kv_step(session, ids, pos, dirty)
    for name in cache:
        changed = {(int(r), int(s)) for r, _, s in np.argwhere(np.any(cache[name] != dirty[name], axis=-1))}
        assert changed == {(0, 5), (0, 6), (0, 7), (1, 2)}, name


def test_continuous_batching_full_row_and_an_all_pad_row(kv_model):
    """batch_index picks the cache rows: the full chunk lands in row 2; an all-pad entry aimed
    at row 0 leaves it as it was; row 1, which no entry names, is untouched."""
    session = OrtSession(kv_model(extra=",continuous_batching=true"), ctx_len=CTX,
                         full_batch_size=3)
    dirty = _random_cache(session, 3, seed=9)
    ids = [PROMPT + [0], [0] * (CTX + 1)]
    pos = [list(range(CTX)) + [-1], [-1] * (CTX + 1)]
    logits, cache = kv_step(session, ids, pos, dirty, batch_index=[2, 0])
    _check_row(logits, {name: cache[name][[2]] for name in cache}, 0, "llama")
    for name in cache:
        np.testing.assert_array_equal(cache[name][:2], dirty[name][:2], err_msg=name)


def test_mxint8kv_full_chunk_with_a_pad(kv_model, tmp_path):
    """mxint8kv over the changed cache write: the 9-wide chunk stores the MXINT8 of the fp32
    cache that the plain 8-wide chunk writes (itself checked against Hugging Face above)."""
    from qeff.passes.mx import quantize_dequantize

    fp32 = OrtSession(kv_model(), ctx_len=CTX)
    _, plain = kv_step(fp32, [PROMPT], [list(range(CTX))], zero_cache(fp32, 1))
    mx_path = tmp_path / "mx.onnx"
    optimize(kv_model(), "mxint8kv", output=mx_path)
    mx = OrtSession(mx_path, ctx_len=CTX)
    _, got = kv_step(mx, [PROMPT + [0]], [list(range(CTX)) + [-1]], zero_cache(mx, 1))
    for name in ("past_key.0", "past_value.0"):  # layer 0's K/V do not depend on earlier attention
        np.testing.assert_array_equal(got[name], quantize_dequantize(plain[name], "int8", axis=-1))
    for name, cache in got.items():
        np.testing.assert_array_equal(quantize_dequantize(cache, "int8", axis=-1), cache, err_msg=name)
