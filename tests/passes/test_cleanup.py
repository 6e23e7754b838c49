from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.passes import CleanupPass, as_ir_model, save_model
from tests.graphs import TWO_MATMULS, mlp_expected, mlp_model, parse, run


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_removes_dead_nodes_identity_unused_and_duplicates_and_keeps_numerics(tmp_path):
    proto, weights = mlp_model()
    model = as_ir_model(proto)
    result = CleanupPass()(model)

    assert result.modified
    ops = _ops(model)
    assert "Identity" not in ops
    assert ops.count("Add") == 1 and "Mul" not in ops  # the dead Add → Mul chain is gone
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert set(model.graph.initializers) == {"w"}  # junk removed, w_dup merged into w
    assert result.details["duplicates_merged"] == 1
    assert result.details["inputs_removed"] == ["unused"]

    out = save_model(model, tmp_path / "clean.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], mlp_expected(x, weights["w"]), rtol=1e-6, atol=1e-6)


def test_keeps_unused_inputs_when_asked():
    proto, _ = mlp_model()
    model = as_ir_model(proto)
    CleanupPass(remove_unused_inputs=False)(model)
    assert [v.name for v in model.graph.inputs] == ["x", "unused"]


def test_no_dedup_option_keeps_twins():
    proto, _ = mlp_model()
    model = as_ir_model(proto)
    CleanupPass(deduplicate=False)(model)
    assert set(model.graph.initializers) == {"w", "w_dup"}


def test_same_ends_different_middle_are_not_merged():
    # Two large tensors equal in their first and last 4 KB must still be told apart.
    a = np.zeros(8192, np.float32)
    b = a.copy()
    b[4000] = 1.0
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[8192] x) => (float[8192] y) {
        t = Add(x, a)
        y = Add(t, b)
    }
    """
    model = as_ir_model(parse(text, {"a": a, "b": b}))
    p = CleanupPass()(model)
    assert set(model.graph.initializers) == {"a", "b"}
    assert p.details["duplicates_merged"] == 0


def test_external_duplicates_merged_without_loading(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    src = save_model(as_ir_model(parse(TWO_MATMULS, {"w1": w, "w2": w.copy()})), tmp_path / "ext.onnx", external_data=True)
    model = ir.load(src)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    CleanupPass()(model)
    assert len(model.graph.initializers) == 1
    out = save_model(model, tmp_path / "out.onnx", external_data=True)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], x @ w @ w, rtol=1e-5, atol=1e-5)


def test_sorts_topologically():
    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("Relu", ["t"], ["y"]),
        onnx.helper.make_node("Add", ["x", "x"], ["t"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "unsorted",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    model = as_ir_model(proto)
    p = CleanupPass()(model)
    assert p.modified
    assert _ops(model) == ["Add", "Relu"]
    assert p.details["reordered"] is True
    x = rng.standard_normal(3).astype(np.float32)
    np.testing.assert_allclose(run(ir.serde.serialize_model(model), {"x": x})["y"], np.maximum(2 * x, 0))


def test_graph_output_identity_of_input_is_kept():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[3] x) => (float[3] y) {
        y = Identity(x)
    }
    """
    model = as_ir_model(parse(text))
    CleanupPass()(model)
    assert _ops(model) == ["Identity"]


def test_clean_graph_is_not_modified():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[3] x) => (float[3] y) {
        y = Relu(x)
    }
    """
    model = as_ir_model(parse(text))
    assert not CleanupPass()(model).modified


@pytest.mark.parametrize("dtype,type_name", [(np.float16, "float16"), (np.int64, "int64"), (np.uint8, "uint8")])
def test_dedup_other_dtypes(dtype, type_name):
    a = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g ({type_name}[3, 4] x) => (y) {{
        t = Add(x, a)
        y = Add(t, b)
    }}
    """
    model = as_ir_model(parse(text, {"a": a, "b": a.copy()}, check=False))
    CleanupPass()(model)
    assert len(model.graph.initializers) == 1
