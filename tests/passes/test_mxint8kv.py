"""mxint8kv: the in-graph MXINT8 simulation is bit-identical to the C kernel, and after kv the
cache attention reads (and the retained state) is exactly the MXINT8-quantized K/V."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from qeff.errors import QeffError
from qeff.common.onnxrt import onnxruntime_session
from qeff.optimizer import optimize
from qeff.passes.mx import quantize_dequantize
from qeff.passes.mx.kv import mxint8_qdq
from qeff.verify import verify_kv_model
from tests.kv_drive import kv_generate
from tests.passes.test_kv import CTX


def _qdq_model(shape: tuple[int, ...], scale: str) -> bytes:
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    nodes, out = mxint8_qdq(graph, x, shape[-1], 32, scale, prefix="q")
    graph.extend(nodes)
    out.name = "y"
    graph.outputs.append(out)
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()


def _edge_values(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape[:-1] + (1,))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0] = 0.0  # an all-zero block
    flat[1, :4] = [1e-40, -3e-41, 2 ** -149, 0]  # fp32 subnormals
    flat[2, 0] = np.nextafter(np.float32(4.0), np.float32(0))  # just below a power of two
    flat[2, 1:] = 0.5
    flat[3, 0] = 32.5 / 64  # a tie of codes 32 and 33 at scale 1
    flat[3, 1] = 1.0
    flat[4, 7] = np.nan
    flat[5, 3] = -np.inf
    flat[6, :] = np.finfo(np.float32).max
    flat[7, 2] = -np.float32(1.995)
    return x


@pytest.mark.parametrize("scale", ["ocp", "ocp_plus1"])
def test_in_fp16_every_fp16_cache_value_stays_finite(scale):
    """The card computes the simulation in fp16: an all-zero block (the cache's unwritten rows)
    once took the scale 2^-127, which is 0 in fp16, and gave 0/0 = NaN. Every fp16 number, zero
    blocks and subnormals included, must come out as the kernel's MXINT8 value of it."""
    from qeff.passes.fp16.simulation import run_fp16

    shape = (1, 2, 4, 32)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, shape[:-1] + (1,))).astype(np.float16)
    flat = x.reshape(-1, 32)
    flat[0] = 0.0
    flat[1, :3] = [2 ** -24, -(2 ** -23), 0]  # fp16 subnormals, the rest zero
    flat[1, 3:] = 0.0
    # ocp_plus1 gives a block whose amax is >= 2^15 the scale 2^16, beyond fp16 (a known limit)
    flat[2, 0] = 65504.0 if scale == "ocp" else 16384.0
    x = x.astype(np.float32)
    model = ir.serde.deserialize_model(__import__("onnx").load_from_string(_qdq_model(shape, scale)))
    got = run_fp16(model, {"x": x})["y"]
    assert np.isfinite(got).all()
    want = quantize_dequantize(x, "int8", axis=-1, scale=scale).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
@pytest.mark.parametrize("scale", ["ocp", "ocp_plus1"])
def test_graph_simulation_is_bit_identical_to_the_kernel(head_dim, scale):
    shape = (2, 3, 5, head_dim)
    x = _edge_values(shape)
    got = onnxruntime_session(_qdq_model(shape, scale)).run(["y"], {"x": x})[0]
    want = quantize_dequantize(x, "int8", axis=-1, scale=scale)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_attention_reads_mxint8_values(tiny_export, tmp_path, arch):
    """Layer 0's retained cache equals the kernel's MXINT8 of the fp32 kv model's (its K/V do
    not depend on earlier attention); every layer's cache is on the MXINT8 grid; generation runs."""
    kv, mx = tmp_path / "kv.onnx", tmp_path / "mx.onnx"
    optimize(tiny_export(arch), f"kv:ctx_len={CTX}", output=kv)
    optimize(kv, "mxint8kv", output=mx)
    prompt = [[5, 9, 3, 7, 1, 4, 2, 8, 6]]
    # One new token: the token comes from the prefill, so the cache is the one prefill wrote.
    plain, quantized = kv_generate(kv, prompt, 1, ctx_len=CTX), kv_generate(mx, prompt, 1, ctx_len=CTX)
    for name in ("past_key.0", "past_value.0"):
        want = quantize_dequantize(plain.cache[name], "int8", axis=-1)
        np.testing.assert_array_equal(quantized.cache[name], want)
    for name, cache in quantized.cache.items():
        np.testing.assert_array_equal(quantize_dequantize(cache, "int8", axis=-1), cache, err_msg=name)
    manifest = json.loads((tmp_path / "mx.qeff.json").read_text())
    assert manifest["kv"]["precision"] == "mxint8"
    assert manifest["custom_io"]["past_key.0"] == manifest["custom_io"]["past_value.1_RetainedState"] == "mxint8"
    # README: kv,mxint8kv agrees with fp32 on every greedy token of the verification (16/16).
    summary = verify_kv_model(tiny_export(arch), mx, ctx_len=CTX, max_new_tokens=8)
    assert summary.token_agreement == "16/16", f"{arch}: kv,mxint8kv tokens vs fp32 {summary.token_agreement}"


def test_needs_kv(tiny_export, tmp_path):
    with pytest.raises(QeffError, match="kv"):
        optimize(tiny_export("llama"), "mxint8kv", output=tmp_path / "x.onnx")
