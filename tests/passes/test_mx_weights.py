"""mxfp6/mxfp4/mxfp8/mxint8: which weights are quantized, along which axis, streamed from
external data, and how accurate the tiny architectures stay. Weights are checked against the
NumPy implementation (itself checked bit for bit against the exact reference in test_mx_kernel)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.optimizer import optimize
from qeff.passes.mx import quantize_dequantize_numpy
from qeff.passes.mx import stream as mx_stream
from qeff.passes.mx.weights import MXFP4Pass, MXFP6Pass, MXINT8Pass
from qeff.verify import verify_kv_model
from tests.passes.test_kv import ARCHS, CTX

_GRAPH = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[3, 70] x, int64[3] ids) => (float[3, 6] logits, float[3, 70] embedded) {
        h = MatMul(x, w_kn)
        g1 = Gemm<transB = 1>(x, w_nk)
        g2 = Gemm(x, w_gemm)
        wt = Transpose<perm = [1, 0]>(tied)
        h2 = MatMul(x, wt)
        embedded = Gather(tied, ids)
        s1 = Add(h, g1)
        s2 = Add(s1, g2)
        s3 = Concat<axis = 1>(s2, h2)
        head_in = Slice(s3, zero, six, one)
        logits = MatMul(head_in, head)
    }"""


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w_kn": rng.standard_normal((70, 5)), "w_nk": rng.standard_normal((5, 70)),
            "w_gemm": rng.standard_normal((70, 5)) * 1e-3, "tied": rng.standard_normal((1, 70)),
            "head": rng.standard_normal((1, 6)).repeat(6, 0) * 7}


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(_GRAPH)
    for name, array in _weights(rng).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    for name, value in {"zero": [0], "six": [6], "one": [1]}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    return proto


def _init(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_each_weight_is_quantized_along_its_reduction_axis():
    """MatMul B [K, N] along axis 0 (with a trailing partial block: K = 70), Gemm transB=1 B
    [N, K] along axis 1, Gemm B along axis 0, a Transpose-fed weight along the transposed axis;
    a tied weight also read by a Gather keeps its value there and the MatMul gets a copy."""
    rng = np.random.default_rng(0)
    proto = _model(rng)
    original = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = ir.serde.deserialize_model(proto)
    mx = MXFP6Pass()(model)
    assert mx.modified
    expected_axis = {"w_kn": 0, "w_nk": 1, "w_gemm": 0, "head": 0}
    for name, axis in expected_axis.items():
        want = quantize_dequantize_numpy(original[name], "fp6_e2m3", axis=axis)
        np.testing.assert_array_equal(_init(model, name), want, err_msg=name)
        assert mx.details["weights"][name]["axis"] == axis
    np.testing.assert_array_equal(_init(model, "tied"), original["tied"])  # the Gather still reads it
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    np.testing.assert_array_equal(transpose.inputs[0].const_value.numpy(),
                                  quantize_dequantize_numpy(original["tied"], "fp6_e2m3", axis=1))
    w, q = original["w_kn"].astype(np.float64), _init(model, "w_kn").astype(np.float64)
    sqnr = 10 * np.log10((w ** 2).sum() / ((w - q) ** 2).sum())
    assert mx.details["weights"]["w_kn"]["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
    assert mx.details["weights"]["w_kn"]["max_abs_error"] == pytest.approx(np.abs(w - q).max())


def test_quantizing_again_gives_the_same_weights():
    model = ir.serde.deserialize_model(_model(np.random.default_rng(1)))
    MXFP4Pass()(model)
    once = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    second = MXFP4Pass()(model)
    for name, array in once.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    assert all(w["max_abs_error"] == 0 for w in second.details["weights"].values())


def test_skip_size_and_lm_head_options():
    model = ir.serde.deserialize_model(_model(np.random.default_rng(2)))
    mx = MXINT8Pass.from_text({"skip": "w_g*|nothing", "min_size": "100", "keep_lm_head": "true"})(model)
    assert mx.details["skipped"] == {"w_gemm": "matches skip", "tied": "fewer than 100 elements",
                                     "head": "fewer than 100 elements"}
    model = ir.serde.deserialize_model(_model(np.random.default_rng(2)))
    mx = MXINT8Pass(keep_lm_head=True)(model)
    assert mx.details["skipped"] == {"head": "lm_head (keep_lm_head)"}


def test_external_weights_are_streamed_in_chunks(tmp_path, monkeypatch):
    """Weights in an external-data file are read in chunks of whole blocks and written to a
    spill file; the saved model equals the in-memory result bit for bit."""
    rng = np.random.default_rng(3)
    proto = _model(rng)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    monkeypatch.setattr(mx_stream, "_CHUNK_BYTES", 32 * 4 * 5)  # one block row of w_kn per chunk
    streamed = tmp_path / "out.onnx"
    result = optimize(src, "mxfp6", output=streamed, external_data=True)
    in_memory = ir.serde.deserialize_model(_model(np.random.default_rng(3)))
    MXFP6Pass()(in_memory)
    saved = ir.load(streamed)
    for name in ("w_kn", "w_nk", "w_gemm", "head"):
        np.testing.assert_array_equal(saved.graph.initializers[name].const_value.numpy(), _init(in_memory, name))
    manifest = json.loads((tmp_path / "out.qeff.json").read_text())
    assert manifest["mx"] == {"pass": "mxfp6", "format": "fp6_e2m3", "block": 32, "rounding": "even",
                              "scale": "ocp", "weights": 5, "compiler_flag": "-mxfp6-matmul"}
    details = result.report.passes[-1].details
    assert details["weights_quantized"] == 5
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w_kn"), base_dir=str(tmp_path))
    q = _init(in_memory, "w_kn")
    sqnr = 10 * np.log10((w.astype(np.float64) ** 2).sum() / ((w.astype(np.float64) - q) ** 2).sum())
    assert details["weights"]["w_kn"]["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)  # measured while written


# Greedy tokens (of 16: two prompts, 8 steps) that kv,mxfp6 shares with the fp32 original, as
# measured and stated in README. Random tiny models have near-tied logits, so one flip changes
# the rest: these are floors that catch a quantization gone wrong, not a quality measure.
MXFP6_AGREEMENT = {"gpt2": 16, "llama": 5, "mistral": 5, "mixtral": 3, "qwen2": 11, "phi3": 1, "falcon": 9,
                   "gptj": 8, "mpt": 9, "codegen": 9, "starcoder2": 9, "gemma": 16}


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_then_mxfp6_on_the_tiny_architectures(tiny_export, tmp_path, arch):
    """kv,mxfp6 runs for every architecture: every MatMul weight quantized at about 31 dB SQNR
    (README), and greedy tokens agree with the fp32 original at least as often as README says."""
    path = tmp_path / "mx.onnx"
    result = optimize(tiny_export(arch), f"kv:ctx_len={CTX},mxfp6", output=path)
    details = result.report.passes[-1].details
    assert details["weights_quantized"] >= 4
    assert all(15 < w["sqnr_db"] < 60 for w in details["weights"].values()), details["weights"]
    assert 30 <= details["min_sqnr_db"] <= 32, details["min_sqnr_db"]
    summary = verify_kv_model(tiny_export(arch), path, ctx_len=CTX, max_new_tokens=8)
    assert summary.steps == 8 and np.isfinite(summary.max_abs)
    agree, total = map(int, summary.token_agreement.split("/"))
    assert total == 16 and agree >= MXFP6_AGREEMENT[arch], f"{arch}: tokens vs fp32 {summary.token_agreement}"


@pytest.mark.parametrize("pass_name", ["mxfp6", "mxint8"])
def test_a_zero_size_weight_is_skipped_not_crashed_on(tmp_path, pass_name):
    """``MatMul(x, W)`` with ``W`` of shape (100000, 0): the CLI reports the weight as skipped
    and writes a model that computes what the original does (an empty product)."""
    import subprocess
    import sys

    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 100000] x) => (float[2, 0] y) { y = MatMul(x, w) }""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((100000, 0), np.float32), "w"))
    src, out = tmp_path / "empty.onnx", tmp_path / "empty.mx.onnx"
    onnx.save(proto, src)
    done = subprocess.run([sys.executable, "-m", "qeff.cli", "opt", str(src), "--passes", pass_name, "-o", str(out),
                           "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["details"]["skipped"] == {"w": "empty (nothing to quantize)"}
    assert ir.load(out).graph.initializers["w"].const_value.shape.numpy() == (100000, 0)
