"""spec and ccl, the decode-time passes after kv, against the plain export recomputing the whole
sequence (spec: every kept logits row at its position; ccl: every length above the positions),
and their specializations as qeff compile writes them."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from qeff.backend_aic import CompileOptions, compile_model
from qeff.errors import PassOptionError, PassSequenceError, QeffError, UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.runtime import OrtSession
from tests.kv_drive import kv_step, zero_cache

CTX = 32
TOKENS = np.array([[5, 9, 3, 7, 11, 2, 8, 6, 4, 10, 13, 1], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]])


def _recompute(plain_path, ids: np.ndarray) -> np.ndarray:
    """Logits of every position from the plain export, the whole sequence at once."""
    session = ort.InferenceSession(str(plain_path))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(ids.shape[1]), (len(ids), 1))}
    return session.run(["logits"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("arch,exporter", [("llama", "dynamo"), ("gpt2", "torchscript")])
@pytest.mark.parametrize("k", [3, 7])
def test_spec_keeps_the_last_k_plus_one_rows(tiny_export, tmp_path, arch, exporter, k):
    plain = tiny_export(arch, exporter=exporter)
    model = optimize(plain, f"kv:ctx_len={CTX},spec:k={k}", tmp_path / "spec.onnx").output
    full = _recompute(plain, TOKENS)
    session = OrtSession(model)
    head = 12 - (k + 1)
    keep1 = {"num_logits_to_keep": np.zeros((1, 1), np.int64)}
    feeds = {"input_ids": TOKENS[:, :head], "position_ids": np.tile(np.arange(head), (2, 1)), **keep1,
             **zero_cache(session, 2)}
    first = session.run(feeds)["logits"]
    np.testing.assert_allclose(first[:, 0], full[:, head - 1], atol=1e-4, rtol=0)  # prefill: one row
    step = {"input_ids": TOKENS[:, head:], "position_ids": np.tile(np.arange(head, 12), (2, 1)),
            "num_logits_to_keep": np.zeros((k + 1, 1), np.int64), **session.state()}
    rows = session.run(step)["logits"]
    assert rows.shape == (2, k + 1, full.shape[-1])
    np.testing.assert_allclose(rows, full[:, head:], atol=1e-4, rtol=0)


def test_spec_rows_end_at_each_rows_last_valid_token(tiny_export, tmp_path):
    """Row 1 has two proposals of three (pads -1 after them): its rows are positions 8..10 then
    a pad; row 0 sends all four."""
    plain = tiny_export("llama")
    model = optimize(plain, f"kv:ctx_len={CTX},spec:k=3", tmp_path / "spec.onnx").output
    full = _recompute(plain, TOKENS)
    session = OrtSession(model)
    session.run({"input_ids": TOKENS[:, :8], "position_ids": np.tile(np.arange(8), (2, 1)),
                 "num_logits_to_keep": np.zeros((1, 1), np.int64), **zero_cache(session, 2)})
    ids = TOKENS[:, 8:].copy()
    pos = np.tile(np.arange(8, 12), (2, 1))
    ids[1, 3], pos[1, 3] = -1, -1
    rows = session.run({"input_ids": ids, "position_ids": pos, "num_logits_to_keep": np.zeros((4, 1), np.int64),
                        **session.state()})["logits"]
    np.testing.assert_allclose(rows[0], full[0, 8:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(rows[1, :3], full[1, 8:11], atol=1e-4, rtol=0)


def test_spec_needs_kv_with_last_logits(tiny_export, tmp_path):
    with pytest.raises(PassSequenceError, match="pass .spec. needs .kv. to run before it"):
        optimize(tiny_export("llama"), "spec", tmp_path / "a.onnx")
    with pytest.raises(UnsupportedGraphError, match="spec: the lm_head does not read the last valid token"):
        optimize(tiny_export("llama"), f"kv:ctx_len={CTX},logits=all,spec", tmp_path / "b.onnx")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("arch,exporter", [("llama", "dynamo"), ("mistral", "torchscript"), ("mpt", "torchscript")])
def test_ccl_equals_the_full_cache_for_every_length_above_the_positions(tiny_export, tmp_path, arch, exporter):
    plain = tiny_export(arch, exporter=exporter)
    full_model = optimize(plain, f"kv:ctx_len={CTX}", tmp_path / "kv.onnx").output
    ccl_model = optimize(plain, f"kv:ctx_len={CTX},ccl:prefill=16|32,decode=12|16|24|32", tmp_path / "ccl.onnx").output
    full_session, ccl_session = OrtSession(full_model), OrtSession(ccl_model)
    _, cache = kv_step(full_session, TOKENS[:, :11], np.tile(np.arange(11), (2, 1)), zero_cache(full_session, 2))
    step = {"input_ids": TOKENS[:, 11:], "position_ids": np.full((2, 1), 11)}
    want = full_session.run({**step, **cache})["logits"]
    for length in (12, 13, 16, 24, 32):
        got = ccl_session.run({**step, **cache, "comp_ctx_lengths": np.zeros(length, np.int64)})
        np.testing.assert_allclose(got["logits"], want, atol=1e-5, rtol=0)
        for name, value in full_session.state().items():  # the write still covers the whole cache
            np.testing.assert_array_equal(ccl_session.state()[name], value)


def test_ccl_options_and_order(tiny_export, tmp_path):
    with pytest.raises(PassOptionError, match="ccl: decode lengths 32|16 must rise"):
        optimize(tiny_export("llama"), f"kv:ctx_len={CTX},ccl:prefill=32,decode=32|16", tmp_path / "a.onnx")
    with pytest.raises(UnsupportedGraphError, match="run ccl right after kv, before fixed"):
        optimize(tiny_export("llama"), f"kv:ctx_len={CTX},fixed:ctx_len={CTX},ccl:prefill=32,decode=32",
                 tmp_path / "b.onnx")


def _specs(model, folder, **options):
    result = compile_model(model, folder, CompileOptions(dry_run=True, **options))
    return json.loads((folder / "specializations.json").read_text())["specializations"], result.command_text


def test_compile_specializations_for_spec_ccl_and_both(tiny_export, tmp_path):
    plain = tiny_export("llama")
    spec = optimize(plain, f"kv:ctx_len={CTX},spec:k=3|7", tmp_path / "spec.onnx").output
    specs, _ = _specs(spec, tmp_path / "c1", prefill_len=8)
    assert specs == [
        {"batch_size": "1", "seq_len": "8", "ctx_len": "32", "num_logits_to_keep": "1"},
        {"batch_size": "1", "seq_len": "4", "ctx_len": "32", "num_logits_to_keep": "4"},
        {"batch_size": "1", "seq_len": "8", "ctx_len": "32", "num_logits_to_keep": "8"}]
    ccl = optimize(plain, f"kv:ctx_len={CTX},ccl:prefill=16|32,decode=8|32", tmp_path / "ccl.onnx").output
    specs, _ = _specs(ccl, tmp_path / "c2", prefill_len=8)
    assert specs == [
        {"batch_size": "1", "seq_len": "8", "ctx_len": "32", "comp_ctx_lengths": "16"},
        {"batch_size": "1", "seq_len": "8", "ctx_len": "32", "comp_ctx_lengths": "32"},
        {"batch_size": "1", "seq_len": "1", "ctx_len": "32", "comp_ctx_lengths": "8"},
        {"batch_size": "1", "seq_len": "1", "ctx_len": "32", "comp_ctx_lengths": "32"}]
    named = json.loads(compile_model(ccl, tmp_path / "c3", CompileOptions(
        dry_run=True, prefill_len=8, specializations_format="named")).folder.joinpath("specializations.json").read_text())
    assert [e["name"] for e in named["specializations"]] == ["Prefill1", "Prefill2", "Decode1", "Decode2"]
    both = optimize(plain, f"kv:ctx_len={CTX},spec:k=3,ccl:prefill=32,decode=16|32", tmp_path / "both.onnx").output
    specs, _ = _specs(both, tmp_path / "c4", prefill_len=8)
    assert specs == [
        {"batch_size": "1", "seq_len": "8", "ctx_len": "32", "num_logits_to_keep": "1", "comp_ctx_lengths": "32"},
        {"batch_size": "1", "seq_len": "4", "ctx_len": "32", "num_logits_to_keep": "4", "comp_ctx_lengths": "16"},
        {"batch_size": "1", "seq_len": "4", "ctx_len": "32", "num_logits_to_keep": "4", "comp_ctx_lengths": "32"}]
    several = optimize(plain, f"kv:ctx_len={CTX},spec:k=3|7,ccl:prefill=32,decode=32", tmp_path / "several.onnx").output
    with pytest.raises(QeffError, match=r"several K \(3\|7\) cannot be compiled with compute context lengths"):
        _specs(several, tmp_path / "c5")
    short = optimize(plain, f"kv:ctx_len={CTX},ccl:prefill=16,decode=32", tmp_path / "short.onnx").output
    with pytest.raises(QeffError, match=r"prefill \[16\] must rise and end at ctx_len 32"):
        _specs(short, tmp_path / "c6")
