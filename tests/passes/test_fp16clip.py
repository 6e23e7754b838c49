"""fp16clip and the fp16 simulation: masks stay finite in fp16, constants are clipped, flagged
activations are clamped or listed for the compiler. Checked against NumPy's float16 and fp32 runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.passes import optimize
from qeff.passes.fp16clip import FP16ClipPass
from qeff.passes.fp16sim import run_fp16, simulate_fp16
from qeff.passes.kv_runner import KVRunner
from qeff.passes.verify import run_onnxruntime
from tests.passes.test_kv import ARCHS, CTX


def _model(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return proto


def test_simulation_rounds_every_stored_tensor_like_numpy_float16():
    proto = _model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y, float[4] z) { y = Mul(x, w)  z = Add(y, y) }""",
        {"w": np.array([1 / 3, 3.0, 1000.0, 1.0], np.float32)},
    )
    x = np.array([0.1, 30000.0, 70.0, 7e-8], np.float32)
    got = run_fp16(proto, {"x": x})
    f16 = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    want_y = f16(f16(x) * f16(np.array([1 / 3, 3.0, 1000.0, 1.0], np.float32)))
    np.testing.assert_array_equal(got["y"], want_y)
    np.testing.assert_array_equal(got["z"], f16(want_y + want_y))
    assert np.isinf(got["y"][1]) and got["y"].dtype == np.float32  # 90000 overflows fp16; I/O stays float32


def test_constants_are_clipped_and_infinities_kept():
    proto = _model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[3] x) => (float[3] y) { c = Constant<value = float[3] {1e9, -7e4, 2.0}>()  s = Add(x, w)  y = Add(s, c) }""",
        {"w": np.array([1e6, -np.inf, 3.0], np.float32)},
    )
    model = ir.serde.deserialize_model(proto)
    clip = FP16ClipPass()
    clip(model)
    assert set(clip.details["constants_clipped"]) == {"w", next(n.name for n in model.graph if n.op_type == "Constant")}
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), [65504.0, -np.inf, 3.0])
    constant = next(n for n in model.graph if n.op_type == "Constant").attributes["value"].as_tensor().numpy()
    np.testing.assert_array_equal(constant, [65504.0, -65504.0, 2.0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_plain_export_masks(tiny_export, tmp_path, attn):
    """eager masks with finfo.min, sdpa with -inf: after fp16clip the fp16 run is finite, padded
    rows included (left and right padding), and close to fp32 on valid tokens."""
    path = tiny_export("llama", attn=attn)
    out = tmp_path / "fp16.onnx"
    result = optimize(path, "fp16clip", output=out)
    assert len(result.report.passes[-1].details["masks_rewritten"]) == 2  # one per layer
    rng = np.random.default_rng(0)
    mask = np.ones((3, 7), np.int64)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    feeds = {"input_ids": rng.integers(1, 500, (3, 7)), "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, -1) - 1, 0, None)}
    reference = run_onnxruntime(path, feeds)["logits"]
    got = run_fp16(out, feeds)["logits"]
    assert np.isfinite(got).all()
    valid = mask.astype(bool)
    assert np.abs(got - reference)[valid].max() < 0.05
    assert (got.argmax(-1) == reference.argmax(-1))[valid].all()


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_then_fp16clip_in_fp16(tiny_export, tmp_path, arch):
    """kv,fp16clip run in fp16 simulation: finite logits and cache, a fully padded chunk row
    included; greedy tokens agree with the fp32 kv model in at least 23 of 24 decode steps."""
    kv_path, fp_path = tmp_path / "kv.onnx", tmp_path / "fp16.onnx"
    optimize(tiny_export(arch), f"kv:ctx_len={CTX}", output=kv_path)
    optimize(kv_path, "fp16clip", output=fp_path)
    fp32 = KVRunner(kv_path, CTX)
    fp16 = KVRunner(simulate_fp16(fp_path).SerializeToString(), CTX)
    prompts = [[5, 9, 3, 7, 1, 4, 2, 8, 6], [6, 3]]  # row 2 is all pads in the second and third chunk
    want, got = fp32.generate(prompts, 25), fp16.generate(prompts, 25)
    for row in range(2):
        assert all(np.isfinite(step).all() for step in got.logits[row])
        agree = sum(a == b for a, b in zip(want.tokens[row][1:], got.tokens[row][1:]))
        assert agree >= 23, (row, want.tokens[row], got.tokens[row])
    assert all(np.isfinite(v).all() for v in got.cache.values())


_OVERFLOW = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 8] x) => (float[2, 8] y) {
        h = MatMul(x, w)
        sq = Mul(h, h)
        y = Div(sq, big)
    }"""


def test_calibration_clamps_or_lists_overflowing_activations(tmp_path):
    w = (np.eye(8, dtype=np.float32) * 400.0)
    proto = _model(_OVERFLOW, {"w": w, "big": np.array(1000.0, np.float32)})
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = np.full((2, 8), 1.0, np.float32)
    assert not np.isfinite(run_fp16(path, {"x": x})["y"]).all()  # 400² = 160000 overflows

    clamped = tmp_path / "clamped.onnx"
    result = optimize(path, "fp16clip:calibrate=2", output=clamped)
    assert list(result.report.passes[-1].details["activations_flagged"]) == ["sq"]
    assert np.isfinite(run_fp16(clamped, {"x": x})["y"]).all()

    listed = tmp_path / "listed.onnx"
    optimize(path, "fp16clip:calibrate=2,action=fp32", output=listed)
    manifest = json.loads((tmp_path / "listed.qeff.json").read_text())
    yaml_text = (tmp_path / manifest["node_precision_info"]).read_text()
    assert yaml_text == "FP32NodeInstanceNames:\n  - sq\n"
    got = run_fp16(listed, {"x": x}, keep_fp32=["sq"])["y"]
    np.testing.assert_allclose(got, run_onnxruntime(path, {"x": x})["y"], rtol=1e-2)
