"""fixed on shape arithmetic that builds tensors, not just shape vectors: TorchScript exports
build the causal mask as ``LessOrEqual(Range[1, S], Range[S, 1])``, which broadcasts to
``[S, S]``; once ``seq_len`` is bound its elements are known and must be the broadcast's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.optimizer import optimize
from qeff.passes.ir.symbolic_shapes import SymbolicShapes
from tests.graphs import parse, run, save

# y[b, i] = sum over j <= i of x[b, j]: a causal mask from two Ranges over seq, as a matrix.
CAUSAL_SUM = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[batch, seq, 4] x) => (float[batch, seq, 4] y) {
    s = Shape(x)
    one = Constant<value = int64 {1}>()
    zero = Constant<value = int64 {0}>()
    n = Gather<axis=0>(s, one)
    r = Range(zero, n, one)
    axis0 = Constant<value = int64[1] {0}>()
    axis1 = Constant<value = int64[1] {1}>()
    row = Unsqueeze(r, axis0)
    col = Unsqueeze(r, axis1)
    mask = LessOrEqual(row, col)
    weights = Cast<to = 1>(mask)
    y = MatMul(weights, x)
}
"""


def test_broadcast_comparison_has_the_broadcast_elements():
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(parse(CAUSAL_SUM)))  # element types
    model.graph.inputs[0].shape = ir.Shape([ir.SymbolicDim("batch"), 4, 4])  # seq bound to 4
    shapes = SymbolicShapes(model, ["batch"]).run()
    mask = next(n for n in model.graph if n.op_type == "LessOrEqual").outputs[0]
    assert [int(d) for d in shapes.shape(mask)] == [4, 4]
    expected = np.arange(4)[None, :] <= np.arange(4)[:, None]
    assert [int(e) for e in shapes.contents[mask]] == expected.astype(int).reshape(-1).tolist()


@pytest.mark.parametrize("seq_len,batch", [(4, 2), (1, 3), (7, 1)])
def test_fixed_causal_sum_matches_numpy(tmp_path, seq_len, batch):
    src = save(parse(CAUSAL_SUM), tmp_path / "m.onnx")
    out = tmp_path / "fixed.onnx"
    optimize(src, f"fixed:seq_len={seq_len}", output=out)
    x = np.random.default_rng(0).standard_normal((batch, seq_len, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], np.cumsum(x, axis=1), rtol=1e-6, atol=1e-6)


def test_contents_follow_numpy_for_broadcasts_concats_and_casts():
    """Each rule against numpy on constants: a [2, 1] by [1, 3] Sub, a Concat of [2, 2]
    matrices along axis 1 (flattened parts interleave), a Where with a [2, 1] condition, and
    a float quotient truncated by a Cast to int64."""
    a = np.array([[1], [5]], dtype=np.int64)
    b = np.array([[2, 3, 4]], dtype=np.int64)
    c = np.array([[1, 2], [3, 4]], dtype=np.int64)
    d = np.array([[5, 6], [7, 8]], dtype=np.int64)
    cond = np.array([[True], [False]])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(parse(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[seq] x) => (int64[2, 3] diff, int64[2, 4] joined, int64[2, 2] picked, int64[1] third) {
            diff = Sub(a, b)
            joined = Concat<axis=1>(c, d)
            picked = Where(cond, c, d)
            s = Shape(x)
            sf = Cast<to = 1>(s)
            three = Constant<value = int64[1] {3}>()
            tf = Cast<to = 1>(three)
            q = Div(sf, tf)
            third = Cast<to = 7>(q)
        }""",
        {"a": a, "b": b, "c": c, "d": d, "cond": cond})))
    assert next(n for n in model.graph if n.op_type == "Div").outputs[0].dtype == ir.DataType.FLOAT
    model.graph.inputs[0].shape = ir.Shape([11])
    shapes = SymbolicShapes(model, []).run()
    by_name = {v.name: v for n in model.graph for v in n.outputs}

    def content(name):
        elements = shapes.contents.get(by_name[name])
        return None if elements is None else [int(e) for e in elements]

    assert content("diff") == (a - b).reshape(-1).tolist()
    assert content("joined") in (None, np.concatenate([c, d], axis=1).reshape(-1).tolist())
    assert content("picked") == np.where(cond, c, d).reshape(-1).tolist()
    assert content("third") == [np.trunc(np.float32(11) / np.float32(3)).astype(np.int64)]


# -- a TorchScript Llama -------------------------------------------------------------------------


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, 0] = 0  # a left pad: the mask path must be the model's, not all ones
    return {"input_ids": rng.integers(1, 500, size=(batch, seq)).astype(np.int64), "attention_mask": mask,
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1))}


@pytest.mark.parametrize(
    "spec,batch",
    [("fixed:seq_len=4", 2), ("fixed:batch_size=1,seq_len=4", 1), ("cleanup,fold,fixed:seq_len=4", 2)],
)
def test_torchscript_llama_fixed_seq_len_matches_the_export(tiny_export, tmp_path, spec, batch):
    src = tiny_export("llama", exporter="torchscript")
    out = tmp_path / "fixed.onnx"
    optimize(src, spec, output=out)
    fixed = ir.load(out)
    ids = next(v for v in fixed.graph.inputs if v.name == "input_ids")
    assert ids.shape[1] == 4
    if batch == 1:  # every symbol bound: nothing of the shape arithmetic is left
        assert ids.shape[0] == 1
        assert not [n for n in fixed.graph if n.op_type == "Shape"]
    feeds = _feeds(batch, 4)
    names = {v.name for v in fixed.graph.inputs}
    expected = run(src, feeds)["logits"]
    got = run(out, {k: v for k, v in feeds.items() if k in names})["logits"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    if batch > 1:  # the padded row really reads the mask: without the pad its logits differ
        unpadded = run(src, {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"])})["logits"]
        assert np.abs(expected[1] - unpadded[1]).max() > 1e-3

