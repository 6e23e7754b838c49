from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qeff.passes import FoldPass, as_ir_model, save_model
from tests.graphs import mlp_expected, mlp_model, parse, run


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _const(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_shape_arithmetic_on_static_dims_folds_and_symbolic_dims_stay(tmp_path):
    proto, weights = mlp_model()
    model = as_ir_model(proto)
    p = FoldPass()(model)
    assert p.modified
    # flat_shape = [-1, 4] and out_last = 4 / 2 depend only on the static last dim.
    np.testing.assert_array_equal(_const(model, "flat_shape"), [-1, 4])
    np.testing.assert_array_equal(_const(model, "out_last"), [2])
    # batch and seq are symbolic: Shape<end=2>(x) and the Concat reading it must remain.
    assert _ops(model).count("Shape") == 1
    assert "Concat" in _ops(model)
    assert p.details["folded"]["Concat"] == 1

    out = save_model(model, tmp_path / "folded.onnx")
    x = np.random.default_rng(2).standard_normal((3, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x, "unused": np.zeros((3, 3), np.float32)})["y"],
                               mlp_expected(x, weights["w"]), rtol=1e-6, atol=1e-6)


def test_constant_subgraph_is_evaluated():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((3,), 0.5, np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 3] x) => (float[2, 3] y) {
        s = Add(a, b)
        e = Exp(s)
        t = Transpose<perm=[1, 0]>(e)
        u = Transpose<perm=[1, 0]>(t)
        y = Mul(x, u)
    }
    """
    model = as_ir_model(parse(text, {"a": a, "b": b}))
    FoldPass()(model)
    assert _ops(model) == ["Mul"]
    folded = model.graph.node(0).inputs[1].const_value.numpy()
    np.testing.assert_allclose(folded, np.exp(a + b), rtol=1e-6)


def test_size_limit_keeps_large_tensors_unmaterialised():
    w = np.random.default_rng(0).standard_normal((100, 100)).astype(np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 100] x) => (float[2, 100] y) {
        wt = Transpose<perm=[1, 0]>(w)
        y = MatMul(x, wt)
    }
    """
    model = as_ir_model(parse(text, {"w": w}))
    assert not FoldPass()(model).modified  # 10000 elements > 8192
    assert _ops(model) == ["Transpose", "MatMul"]

    model = as_ir_model(parse(text, {"w": w}))
    assert FoldPass(max_elements=20000)(model).modified
    assert _ops(model) == ["MatMul"]
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), w.T)


def test_random_ops_and_graph_outputs_are_not_folded():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2] x) => (float[2] y, float[2] c) {
        r = RandomUniform<shape=[2]>()
        y = Add(x, r)
        c = Add(k, k)
    }
    """
    model = as_ir_model(parse(text, {"k": np.ones(2, np.float32)}))
    assert not FoldPass()(model).modified
    assert _ops(model) == ["RandomUniform", "Add", "Add"]


@pytest.mark.parametrize(
    "starts,ends,expected",
    [(-1, 2**62, [16]), (0, 1, [0]), (1, -1, [8]), (-2, -1, [8])],
)
def test_slice_of_partially_known_shape(starts, ends, expected):
    # dim 0 symbolic, dims 1 and 2 static: slices over static entries fold.
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[batch, 8, 16] x) => (int64[n] y) {{
        s = Shape(x)
        st = Constant<value = int64[1] {{{starts}}}>()
        en = Constant<value = int64[1] {{{ends}}}>()
        sl = Slice(s, st, en)
        y = Identity(sl)
    }}
    """
    model = as_ir_model(parse(text))
    FoldPass()(model)
    if expected == [0]:
        # Slicing the symbolic batch dim cannot fold.
        assert "Slice" in _ops(model)
    else:
        assert _ops(model) == ["Identity"]
        np.testing.assert_array_equal(model.graph.node(0).inputs[0].const_value.numpy(), expected)


def test_integer_division_truncates_toward_zero():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[batch, 7] x) => (float[batch, m] y) {
        s = Shape(x)
        i = Constant<value = int64 {1}>()
        d = Gather<axis=0>(s, i)
        n = Neg(d)
        two = Constant<value = int64 {2}>()
        q = Div(n, two)
        p = Neg(q)
        k = Unsqueeze(p, zero)
        y = Slice(x, zero, k, one)
    }
    """
    zero = np.array([0], np.int64)
    one = np.array([1], np.int64)
    model = as_ir_model(parse(text, {"zero": zero, "one": one}))
    FoldPass()(model)
    # -7 / 2 is -3 in ONNX (truncation), so the slice end is 3.
    assert _ops(model) == ["Slice"]
    np.testing.assert_array_equal(model.graph.node(0).inputs[2].const_value.numpy(), [3])
    x = np.arange(14, dtype=np.float32).reshape(2, 7)
    np.testing.assert_array_equal(run(ir.serde.serialize_model(model), {"x": x})["y"], x[:, :3])


def test_scalar_gather_keeps_rank():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[batch, 6] x) => (float[batch, 6] y) {
        s = Shape(x)
        i = Constant<value = int64 {1}>()
        d = Gather<axis=0>(s, i)
        f = Cast<to=1>(d)
        y = Mul(x, f)
    }
    """
    model = as_ir_model(parse(text))
    FoldPass()(model)
    assert _ops(model) == ["Mul"]
    factor = model.graph.node(0).inputs[1].const_value.numpy()
    assert factor.shape == () and factor.dtype == np.float32 and factor == 6.0


def test_legacy_style_shape_chain_without_value_info_uses_shape_inference():
    # No value_info: the pass must infer shapes to see that dim 2 is 4.
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[batch, seq, 4] x) => (float[batch, seq, 4] y) {
        r = Relu(x)
        s = Shape(r)
        i = Constant<value = int64 {2}>()
        d = Gather<axis=0>(s, i)
        du = Unsqueeze(d, zero)
        m = Constant<value = int64[1] {-1}>()
        shp = Concat<axis=0>(m, du)
        flat = Reshape(r, shp)
        y = Reshape(flat, s)
    }
    """
    model = as_ir_model(parse(text, {"zero": np.array([0], np.int64)}))
    p = FoldPass()(model)
    np.testing.assert_array_equal(_const(model, "shp"), [-1, 4])
    assert p.details["folded"]["Concat"] == 1
