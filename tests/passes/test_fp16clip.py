"""fp16clip and the fp16 simulation: masks stay finite in fp16, constants are clipped, flagged
activations are clamped or listed for the compiler. Checked against NumPy's float16 and fp32 runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.common.onnxrt import run_model as run_onnxruntime
from qeff.optimizer import optimize
from qeff.passes.fp16.fp16clip import FP16ClipPass
from qeff.passes.fp16.simulation import expose_float32_values, run_fp16, simulate_fp16
from qeff.runtime import OrtSession
from tests.kv_drive import kv_generate
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
    clip = FP16ClipPass()(model)
    assert set(clip.details["constants_clipped"]) == {"w", next(n.name for n in model.graph if n.op_type == "Constant")}
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), [65504.0, -np.inf, 3.0])
    constant = next(n for n in model.graph if n.op_type == "Constant").attributes["value"].as_tensor().numpy()
    np.testing.assert_array_equal(constant, [65504.0, -65504.0, 2.0])


def test_external_weights_are_scanned_from_the_file_in_chunks(tmp_path, monkeypatch):
    from qeff.passes import as_ir_model, save_model
    from qeff.passes.fp16 import fp16clip

    rng = np.random.default_rng(0)
    fine = rng.standard_normal((300, 7)).astype(np.float32)
    large = rng.standard_normal((300, 7)).astype(np.float32)
    large[123, 4], large[299, 6] = 1e6, -np.inf  # one value past fp16's range, in a late chunk
    proto = _model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 300] x) => (float[2, 7] y) { a = MatMul(x, fine)  b = MatMul(x, large)  y = Add(a, b) }""",
        {"fine": fine, "large": large},
    )
    path = save_model(as_ir_model(proto), tmp_path / "m.onnx", external_data=True)
    model = ir.load(path)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    # Chunks of 100 elements: the value past the range sits in the 9th of 21 chunks.
    monkeypatch.setattr(fp16clip, "_CHUNK", 100)
    mapped = []
    real_numpy = ir.ExternalTensor.numpy
    monkeypatch.setattr(ir.ExternalTensor, "numpy", lambda self: mapped.append(self.name) or real_numpy(self))
    clip = FP16ClipPass()(model)
    assert clip.details["constants_clipped"] == {"large": "1e+06"}
    assert mapped == ["large"]  # only the tensor that changes is read whole
    want = large.copy()
    want[123, 4] = 65504.0
    np.testing.assert_array_equal(model.graph.initializers["large"].const_value.numpy(), want)
    np.testing.assert_array_equal(model.graph.initializers["fine"].const_value.numpy(), fine)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_plain_export_masks(tiny_export, tmp_path, attn, exporter):
    """Masks with finfo.min (dynamo, TorchScript eager) and with -inf (TorchScript sdpa), built
    through Where, Expand and ConstantOfShape chains: after fp16clip the fp16 run is finite,
    padded rows included (left and right padding), and close to fp32 on valid tokens."""
    path = tiny_export("llama", exporter=exporter, attn=attn)
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
    simulated = simulate_fp16(fp_path)
    expose_float32_values(simulated)  # every intermediate is checked, not only logits and cache
    fp16 = OrtSession(simulated.SerializeToString(), ctx_len=CTX)
    nonfinite = _record_nonfinite(fp16)
    prompts = [[5, 9, 3, 7, 1, 4, 2, 8, 6], [6, 3]]  # row 2 is all pads in the second and third chunk
    want = kv_generate(kv_path, prompts, 25, ctx_len=CTX)
    got = kv_generate(None, prompts, 25, session=fp16)
    assert not nonfinite, sorted(nonfinite)[:10]
    for row in range(2):
        agree = sum(a == b for a, b in zip(want.tokens[row][1:], got.tokens[row][1:]))
        assert agree >= 23, (row, want.tokens[row], got.tokens[row])


def _record_nonfinite(session: OrtSession) -> set[str]:
    """Names of the outputs of ``session`` that held NaN or Inf in any call from now on (the
    retained cache is checked through ``state()`` after each call)."""
    seen: set[str] = set()
    run = session.run

    def recording(feeds):  # noqa: ANN001, ANN202
        outputs = run(feeds)
        outputs_and_state = {**outputs, **session.state()}
        seen.update(n for n, o in outputs_and_state.items() if o.dtype.kind == "f" and not np.isfinite(o).all())
        return outputs

    session.run = recording
    return seen


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
    result = optimize(path, "fp16clip:calibrate=2,action=clamp", output=clamped)
    assert list(result.report.passes[-1].details["activations_flagged"]) == ["sq"]
    assert np.isfinite(run_fp16(clamped, {"x": x})["y"]).all()

    listed = tmp_path / "listed.onnx"
    optimize(path, "fp16clip:calibrate=2,action=fp32", output=listed)
    manifest = json.loads((tmp_path / "listed.qeff.json").read_text())
    yaml_text = (tmp_path / manifest["node_precision_info"]).read_text()
    assert yaml_text == "FP32NodeInstanceNames:\n  - sq\n"
    got = run_fp16(listed, {"x": x}, keep_fp32=["sq"])["y"]
    np.testing.assert_allclose(got, run_onnxruntime(path, {"x": x})["y"], rtol=1e-2)


_CLASSIC_MASK = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 4, 4] scores, int64[2, 4] m) => (float[2, 4, 4] p) {
        mf = Cast<to = 1>(m)
        inverted = Sub(one, mf)
        extended = Mul(inverted, fmin)
        bias = Unsqueeze(extended, axis1)
        s = Add(scores, bias)
        p = Softmax<axis = -1>(s)
    }"""


def test_classic_extended_mask_times_finfo_min():
    """BERT's classic ``(1 - mask) * finfo.min``: in fp16, finfo.min is -inf and 0 * -inf is NaN.
    After fp16clip, visible keys match a NumPy softmax and a fully masked row is uniform."""
    proto = _model(_CLASSIC_MASK, {"one": np.array(1.0, np.float32),
                                   "fmin": np.array(np.finfo(np.float32).min, np.float32),
                                   "axis1": np.array([1], np.int64)})
    rng = np.random.default_rng(0)
    feeds = {"scores": rng.standard_normal((2, 4, 4)).astype(np.float32) * 4,
             "m": np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.int64)}
    assert np.isnan(run_fp16(proto, feeds)["p"]).any()

    model = ir.serde.deserialize_model(proto)
    clip = FP16ClipPass()(model)
    assert len(clip.details["masks_rewritten"]) == 1 and "fmin" in clip.details["constants_clipped"]
    got = run_fp16(ir.serde.serialize_model(model), feeds)["p"]
    visible = np.exp(feeds["scores"][0, :, :3].astype(np.float64))
    np.testing.assert_allclose(got[0, :, :3], visible / visible.sum(-1, keepdims=True), atol=2e-3)
    assert (got[0, :, 3] == 0).all()
    np.testing.assert_array_equal(got[1], np.full((4, 4), 0.25, np.float32))


_RMS_NORM = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[4, 16] x) => (float[4, 16] y) {
        sq = Pow(x, two)
        ms = ReduceMean<keepdims = 1>(sq, last)
        shifted = Add(ms, eps)
        root = Sqrt(shifted)
        %s
        y = Mul(normed, w)
    }"""
_RMS_FORMS = {"reciprocal": "inv = Reciprocal(root)  normed = Mul(x, inv)",
              "one_over": "inv = Div(one, root)  normed = Mul(inv, x)",
              "divide": "normed = Div(x, root)"}


@pytest.mark.parametrize("form", list(_RMS_FORMS))
def test_rms_norm_square_is_rescaled_exactly(tmp_path, form):
    """Hidden states of ~2000 fit fp16 but their squares do not. Calibration rescales the square
    by a power of two; the norm then matches float64 NumPy within fp16 precision, with no clamp."""
    w = np.linspace(0.5, 1.5, 16, dtype=np.float32)
    proto = _model(_RMS_NORM % _RMS_FORMS[form], {"two": np.array(2.0, np.float32), "last": np.array([-1], np.int64),
                                                 "eps": np.array(1e-6, np.float32), "one": np.array(1.0, np.float32),
                                                 "w": w})
    x = (np.random.default_rng(1).standard_normal((4, 16)) * 2000).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.savez(tmp_path / "samples.npz", x=x[None])
    assert np.abs(run_fp16(proto, {"x": x})["y"] - want).max() > 0.5  # the square overflowed

    model = ir.serde.deserialize_model(proto)
    clip = FP16ClipPass(samples=str(tmp_path / "samples.npz"), action="clamp")(model)
    k = clip.details["norms_rescaled"]["sq"]
    assert 2.0 ** (-2 * k) * (x64 ** 2).max() * 4 <= 65504 < 2.0 ** (2 - 2 * k) * (x64 ** 2).max() * 4
    assert clip.details["clamped"] == [] and not any(n.op_type == "Clip" for n in model.graph)
    rescaled = ir.serde.serialize_model(model)
    np.testing.assert_allclose(run_onnxruntime_proto(rescaled, {"x": x}), want, rtol=1e-5)
    got = run_fp16(rescaled, {"x": x})["y"]
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()


def run_onnxruntime_proto(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_calibration_on_a_model_with_one_layer_scaled_to_overflow(tmp_path):
    """A tiny llama whose first MLP projects 1e5 times too large: its residual stream and norm
    squares leave fp16 range and the fp16 run gives NaN. With calibration (default action fp32)
    the fp16 run, with the listed values kept in fp32 as the compiler would, is finite and within
    1% of fp32; --verify runs the fp16 simulation and fails without calibration."""
    torch = pytest.importorskip("torch")
    from qeff.errors import VerificationError
    from qeff.frontend import build_tiny_model, export_causal_lm

    model = build_tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
    path = export_causal_lm(model, tmp_path / "scaled.onnx", external_data=False, progress=False)
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0
    feeds = {"input_ids": np.random.default_rng(0).integers(1, 500, (2, 6)), "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, -1) - 1, 0, None)}
    want = run_onnxruntime(path, feeds)["logits"]
    assert not np.isfinite(run_fp16(path, feeds)["logits"]).all()

    out = tmp_path / "calibrated.onnx"
    result = optimize(path, "fp16clip:calibrate=4", output=out, verify=True)
    details = result.report.passes[-1].details
    assert len(details["norms_rescaled"]) == 3  # the norms after the scaled layer
    verification = result.report.verification
    assert verification.finite and verification.max_rel <= 1e-2
    manifest = json.loads((tmp_path / "calibrated.qeff.json").read_text())
    listed = (tmp_path / manifest["node_precision_info"]).read_text().splitlines()
    assert listed[0] == "FP32NodeInstanceNames:" and [n[4:] for n in listed[1:]] == details["fp32_nodes"]
    got = run_fp16(out, feeds, keep_fp32=details["fp32_nodes"])["logits"]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()

    clamped = optimize(path, "fp16clip:calibrate=4,action=clamp", output=tmp_path / "clamped.onnx")
    assert clamped.report.passes[-1].details["clamped"]
    assert np.isfinite(run_fp16(tmp_path / "clamped.onnx", feeds)["logits"]).all()  # finite, not accurate

    with pytest.raises(VerificationError, match="NaN or Inf"):
        optimize(path, "fp16clip", output=tmp_path / "unsafe.onnx", verify=True)
    assert not (tmp_path / "unsafe.onnx").exists()


# -- masks the rules must recognise in any spelling ------------------------------------------------

_FMIN = float(np.finfo(np.float32).min)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _scores_model(nodes: list[onnx.NodeProto], outputs: list[str], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """q [1, 2, 4, 8] · k [1, 2, 8, 4] → scores, then ``nodes``; every node is unnamed."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "k"], ["scores"]), *nodes], "masks",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 4, 8]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 8, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _qk(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((1, 2, 4, 8)).astype(np.float32) * 3,
            "k": rng.standard_normal((1, 2, 8, 4)).astype(np.float32) * 3}


def test_two_unnamed_masking_selects_get_unique_fills():
    """Two unnamed ``Where(c, scores, finfo.min)`` before two Softmaxes: each gets its own
    −65504 fill, and the outputs are the masked softmax NumPy computes."""
    from onnx import helper

    causal = np.tril(np.ones((4, 4), bool))[None, None]
    strided = (np.arange(4)[None, :] % 2 == 0)[None, None].repeat(4, axis=2)
    nodes = [helper.make_node("Where", ["causal", "scores", "fmin"], ["w1"]),
             helper.make_node("Softmax", ["w1"], ["p1"], axis=-1),
             helper.make_node("Where", ["strided", "scores", "fmin"], ["w2"]),
             helper.make_node("Softmax", ["w2"], ["p2"], axis=-1)]
    proto = _scores_model(nodes, ["p1", "p2"], {"causal": causal, "strided": strided,
                                                 "fmin": np.array(_FMIN, np.float32)})
    model = ir.serde.deserialize_model(proto)
    result = FP16ClipPass()(model)
    assert len(result.details["select_fills"]) == 2
    names = [v.name for v in model.graph.initializers.values()]
    assert len(names) == len(set(names))
    feeds = _qk()
    scores = feeds["q"] @ feeds["k"]
    got = run_onnxruntime(ir.serde.serialize_model(model).SerializeToString(), feeds)
    for out, mask in (("p1", causal), ("p2", strided)):
        want = _softmax(np.where(mask, scores.astype(np.float64), -np.inf))
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-7, err_msg=out)


def test_mask_expanded_to_the_scores_shape_is_a_mask():
    """``Add(scores, Expand(Where(c, 0, finfo.min), Shape(scores)))``: the mask reaches the scores
    only through ``Shape``, which carries no values, so it is an additive mask and becomes a
    select. Row 0 masks every key: in fp16 a clipped −65504 plus a negative score is −inf, the
    whole row −inf and its softmax NaN; after the rewrite it is finite."""
    from onnx import helper

    visible = np.tril(np.ones((4, 4), bool))[None, None]
    visible[..., 0, :] = False  # a padded query: nothing is visible
    nodes = [helper.make_node("Where", ["visible", "zero", "fmin"], ["m"]),
             helper.make_node("Shape", ["scores"], ["shape"]),
             helper.make_node("Expand", ["m", "shape"], ["mask"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1)]
    proto = _scores_model(nodes, ["p"], {"visible": visible, "zero": np.array(0.0, np.float32),
                                         "fmin": np.array(_FMIN, np.float32)})
    feeds = _qk(1)
    feeds["q"][..., 0, :] = np.abs(feeds["q"][..., 0, :])  # row 0 scores all negative:
    feeds["k"] = -np.abs(feeds["k"])                         # −65504 + score overflows in fp16
    model = ir.serde.deserialize_model(proto)
    result = FP16ClipPass()(model)
    assert len(result.details["masks_rewritten"]) == 1
    rewritten = ir.serde.serialize_model(model)
    got = run_fp16(rewritten, feeds)["p"]
    assert np.isfinite(got).all()
    scores = (feeds["q"] @ feeds["k"]).astype(np.float64)
    want = _softmax(np.where(visible, scores, -np.inf)[..., 1:, :])
    np.testing.assert_allclose(got[..., 1:, :], want, atol=2e-3)
    np.testing.assert_allclose(got[..., 0, :], 0.25, atol=1e-3)  # a uniform softmax over 4 keys
