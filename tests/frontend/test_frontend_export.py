"""Plain export of every tiny architecture: interface of the graph and agreement with torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from qeff.frontend import TINY_ARCHITECTURES, build_tiny_model, compare_with_onnxruntime  # noqa: E402

pytestmark = pytest.mark.slow

CONFIGURATIONS = [(arch, "dynamo") for arch in TINY_ARCHITECTURES] + [("gpt2", "torchscript"), ("llama", "torchscript")]
ALIBI = {"mpt"}  # no position_ids argument in the HF forward


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize(("arch", "exporter"), CONFIGURATIONS)
def test_export_interface_and_onnxruntime_matches_torch(arch, exporter, tiny_export):
    path = tiny_export(arch, exporter=exporter)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)

    expected_inputs = ["input_ids", "attention_mask"] + ([] if arch in ALIBI else ["position_ids"])
    assert [i.name for i in model.graph.input] == expected_inputs
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64, value.name
        assert _dims(value) == ["batch", "seq"], value.name
    assert [o.name for o in model.graph.output] == ["logits"]
    (logits,) = model.graph.output
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(logits) == ["batch", "seq", 512]
    assert not model.graph.initializer or all(not t.external_data for t in model.graph.initializer)

    diff = compare_with_onnxruntime(build_tiny_model(arch, seed=0), path)
    assert diff <= 1e-4, f"{arch}/{exporter}: max abs diff {diff}"


def _reference_feeds(batch, seq, left_pad, rng):
    """Inputs built here, not by qeff.frontend, so the checker in check.py is itself checked."""
    input_ids = rng.integers(0, 512, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):
        pads = min(seq - 1, 3 * row)
        if left_pad:
            mask[row, :pads] = 0
        else:
            mask[row, seq - pads :] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


@pytest.mark.parametrize(("arch", "exporter"), [("llama", "dynamo"), ("gpt2", "torchscript"), ("mpt", "dynamo")])
def test_inline_comparison_at_other_shapes(arch, exporter, tiny_export):
    path = tiny_export(arch, exporter=exporter)
    torch_model = build_tiny_model(arch, seed=0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(1234)
    # Shapes unlike the tracing example (2 x 8): one token, a larger batch, left and right padding.
    for batch, seq, left_pad in [(1, 1, False), (3, 11, False), (3, 11, True), (1, 20, False)]:
        feeds = _reference_feeds(batch, seq, left_pad, rng)
        with torch.no_grad():
            kwargs = {name: torch.from_numpy(feeds[name]) for name in names}
            expected = torch_model(**kwargs, use_cache=False).logits.numpy()
        (actual,) = session.run(["logits"], {name: feeds[name] for name in names})
        assert actual.shape == (batch, seq, 512)
        valid = feeds["attention_mask"].astype(bool)
        diff = np.abs(actual[valid] - expected[valid]).max()
        assert diff <= 1e-4, (batch, seq, left_pad, diff)
        # The comparison must be able to fail: the logits are far from constant.
        assert np.abs(expected[valid]).max() > 1.0


def test_checker_detects_a_different_model(tiny_export):
    # Same architecture, other seed: the check must report a large difference.
    path = tiny_export("llama")
    assert compare_with_onnxruntime(build_tiny_model("llama", seed=1), path) > 0.1


def test_dynamo_graph_keeps_symbolic_shapes_and_default_opset(tiny_export):
    model = onnx.load(str(tiny_export("llama")))
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset[""] == 20
    symbols = {d.dim_param for v in model.graph.value_info for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert {"batch", "seq"} <= symbols
