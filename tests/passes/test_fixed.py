"""The fixed pass. Symbolic form: every dim is a number or a declared symbol (checked against
the shapes onnxruntime actually produces), one shared computation per symbol, outputs unchanged.
Bound form: static graph, no Shape op, outputs unchanged. Trilu replacement against NumPy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import sympy

from qeff.errors import PassOptionError, UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.passes.fixed import FixedPass
from qeff.runtime import OrtSession
from tests.kv_drive import kv_step, zero_cache
from tests.passes.test_kv import ARCHS, CTX


def _not_static(model: ir.Model) -> list[str]:
    return [o.name for n in model.graph for o in n.outputs
            if o.shape is None or any(not isinstance(d, int) for d in o.shape)]


def _ops(model: ir.Model, op: str) -> int:
    return sum(n.op_type == op for n in model.graph)


def _session(model: ir.Model | onnx.ModelProto, extra_outputs: bool = False) -> ort.InferenceSession:
    """An unoptimised CPU session (onnxruntime's fusions depend on shapes and would blur an exact
    comparison); with ``extra_outputs`` every intermediate value is an output too."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    if extra_outputs:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        known = {o.name for o in proto.graph.output}
        for node in proto.graph.node:
            for name in node.output:
                if name and name not in known:
                    proto.graph.output.append(onnx.ValueInfoProto(name=name))
                    known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _assert_dims_match_runtime(model: ir.Model, feeds: dict[str, np.ndarray], sizes: dict[str, int]) -> None:
    """Every value's declared dims, evaluated at ``sizes``, equal the shape onnxruntime computes."""
    symbols = {name: sympy.Symbol(name) for name in sizes}
    session = _session(model, extra_outputs=True)
    actual = dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds)))
    checked = 0
    for node in model.graph:
        for value in node.outputs:
            assert value.shape is not None, f"{value.name} has no shape"
            want = []
            for d in value.shape:
                assert isinstance(d, int) or d.value, f"{value.name} has an unknown dim: {value.shape}"
                expr = d if isinstance(d, int) else sympy.sympify(d.value, locals=symbols)
                assert isinstance(expr, int) or expr.free_symbols <= set(symbols.values()), (value.name, d)
                want.append(int(sympy.sympify(expr).subs({symbols[k]: v for k, v in sizes.items()})))
            assert list(actual[value.name].shape) == want, (value.name, value.shape, actual[value.name].shape)
            checked += 1
    assert checked == sum(len(n.outputs) for n in model.graph)


# -- hand-built graphs -------------------------------------------------------------------------

def _model(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def test_bound_reshape_target_folds():
    model = _model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, seq, 8] x) => (float[batch, seq, 2, 4] y) {
            s = Shape(x)
            i = Constant<value = int64[2] {0, 1}>()
            bs = Gather(s, i)
            tail = Constant<value = int64[2] {2, 4}>()
            target = Concat<axis = 0>(bs, tail)
            y = Reshape(x, target)
        }"""
    )
    FixedPass(FixedPass.Options(batch_size=3, seq_len=5))(model)
    assert [n.op_type for n in model.graph] == ["Reshape"]
    assert list(model.graph.outputs[0].shape) == [3, 5, 2, 4]
    assert _not_static(model) == []


_TWO_RESHAPES = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[batch, seq, 8] x) => (float[batch, seq, 8] z) {
        s = Shape(x)
        b = Gather<axis = 0>(s, zero)
        zero = Constant<value = int64 {0}>()
        one = Constant<value = int64 {1}>()
        n = Gather<axis = 0>(s, one)
        bu = Unsqueeze(b, axes)
        axes = Constant<value = int64[1] {0}>()
        nu = Unsqueeze(n, axes)
        tail = Constant<value = int64[2] {2, 4}>()
        t1 = Concat<axis = 0>(bu, nu, tail)
        y = Reshape(x, t1)
        r = Relu(y)
        s2 = Shape(r)
        b2 = Slice(s2, st, en)
        st = Constant<value = int64[1] {0}>()
        en = Constant<value = int64[1] {1}>()
        n2 = Slice(s2, en, two)
        two = Constant<value = int64[1] {2}>()
        prod = Mul(b2, n2)
        eight = Constant<value = int64[1] {8}>()
        flat = Concat<axis = 0>(prod, eight)
        f = Reshape(r, flat)
        t3 = Concat<axis = 0>(b2, n2, eight)
        z = Reshape(f, t3)
    }"""


def test_symbolic_shares_one_shape_per_symbol():
    # Topological order is restored by the pass (the text lists some constants late).
    model = _model(_TWO_RESHAPES)
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    want = np.maximum(x, 0)
    FixedPass(FixedPass.Options())(model)
    assert _ops(model, "Shape") == 2  # batch_size and seq_len, read once each
    assert [d.value for d in model.graph.inputs[0].shape[:2]] == ["batch_size", "seq_len"]
    flat = next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].shape.rank() == 2).outputs[0]
    assert [str(d) for d in flat.shape] == ["batch_size*seq_len", "8"]
    got = _session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    _assert_dims_match_runtime(model, {"x": x}, {"batch_size": 3, "seq_len": 5})


def test_symbolic_then_bound_is_static():
    model = _model(_TWO_RESHAPES)
    FixedPass(FixedPass.Options(batch_size=3, seq_len=5))(model)
    assert _ops(model, "Shape") == 0 and _not_static(model) == []
    assert [n.op_type for n in model.graph] == ["Reshape", "Relu", "Reshape", "Reshape"]


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, -1, 0, 2])
def test_trilu_becomes_where_with_identical_numerics(upper, k):
    k_input = "" if k is None else ", kk"
    k_node = "" if k is None else f"kk = Constant<value = int64 {{{k}}}>()"
    model = _model(
        f"""<ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, rows, cols] x) => (float[batch, rows, cols] y) {{
            {k_node}
            y = Trilu<upper = {upper}>(x{k_input})
        }}"""
    )
    fixed = FixedPass(FixedPass.Options(symbols=("rows", "cols")))(model)
    assert _ops(model, "Trilu") == 0
    assert fixed.details["ops_replaced"] == {"Trilu": 1}
    rng = np.random.default_rng(1)
    for shape in [(2, 3, 5), (1, 6, 4), (3, 4, 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[0, 0, 0] = np.inf  # a kept or dropped non-finite value behaves as in Trilu
        reference = np.triu if upper else np.tril
        want = reference(x, 0 if k is None else k)
        np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], want)


def test_trilu_bound_folds_to_a_constant_mask():
    model = _model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[seq, seq] x) => (float[seq, seq] y) {
            one = Constant<value = int64 {1}>()
            y = Trilu<upper = 1>(x, one)
        }"""
    )
    FixedPass(FixedPass.Options(seq_len=6))(model)
    assert [n.op_type for n in model.graph] == ["Where"]
    x = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], np.triu(x, 1))


def test_torch_triu_causal_mask_export(tmp_path):
    """The causal mask of older transformers (``torch.full(min).triu(1)``) exports a Trilu."""
    torch = pytest.importorskip("torch")

    class CausalScores(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201
            seq = x.shape[1]
            mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
            return torch.softmax(x @ x.transpose(1, 2) + mask, dim=-1)

    path = tmp_path / "causal.onnx"
    torch.onnx.export(CausalScores(), (torch.randn(2, 5, 8),), str(path), input_names=["x"], output_names=["p"],
                      dynamic_axes={"x": {0: "batch_size", 1: "seq_len"}, "p": {0: "batch_size", 1: "seq_len"}},
                      opset_version=17, dynamo=False)
    plain = ir.load(path)
    assert _ops(plain, "Trilu") == 1
    out = tmp_path / "causal.fixed.onnx"
    optimize(path, "fixed", output=out)
    fixed = ir.load(out)
    assert _ops(fixed, "Trilu") == 0
    rng = np.random.default_rng(2)
    for seq in (3, 7):
        feeds = {"x": rng.standard_normal((2, seq, 8)).astype(np.float32)}
        np.testing.assert_array_equal(_session(fixed).run(None, feeds)[0], _session(plain).run(None, feeds)[0])
        _assert_dims_match_runtime(fixed, feeds, {"batch_size": 2, "seq_len": seq})


# -- refusals ----------------------------------------------------------------------------------

def test_bad_bindings():
    text = """<ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, 8] x) => (float[batch, 8] y) { y = Relu(x) }"""
    with pytest.raises(PassOptionError, match="no 'ctx_len' dimension"):
        FixedPass(FixedPass.Options(ctx_len=8))(_model(text))
    with pytest.raises(PassOptionError, match="at least 1"):
        FixedPass(FixedPass.Options(batch_size=0))(_model(text))
    with pytest.raises(PassOptionError, match="did you mean 'batch'"):
        FixedPass.from_text({"bach": "2"})(_model(text))
    with pytest.raises(PassOptionError, match="has no option 'bogus'"):
        FixedPass.from_text({"bogus": "x"})


def test_undeclared_input_symbol_is_refused_untouched():
    text = """<ir_version: 10, opset_import: ["" : 18]>
        g (float[batch_size, sequence_length] x) => (float[batch_size, sequence_length] y) { y = Relu(x) }"""
    model = _model(text)
    with pytest.raises(UnsupportedGraphError, match="'sequence_length', not a specialization symbol") as err:
        FixedPass(FixedPass.Options())(model)
    assert "fixed:symbols=sequence_length" in err.value.one_line()
    assert model.graph.inputs[0].shape[1].value == "sequence_length"
    with pytest.raises(UnsupportedGraphError, match="'sequence_length', not a specialization symbol"):
        FixedPass(FixedPass.Options(batch_size=2))(model)
    assert [d.value for d in model.graph.inputs[0].shape] == ["batch_size", "sequence_length"]  # nothing bound
    named = FixedPass.from_text({"symbols": "sequence_length"})(model)
    assert named.details["symbols"] == ["batch_size", "sequence_length"]
    sized = FixedPass.from_text({"sequence_length": "16", "batch_size": "2"})(_model(text))
    assert sized.details["bound"] == {"sequence_length": 16, "batch_size": 2}


# -- exported models ---------------------------------------------------------------------------

def _kv_feeds(cache: dict[str, np.ndarray], ids: np.ndarray, pos: list[list[int]]) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "position_ids": np.array(pos, dtype=np.int64), **cache}


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_then_fixed(tiny_export, tmp_path, arch):
    """kv,fixed gives the same logits and cache as kv alone, in symbolic form (dims checked
    against onnxruntime's) and bound for prefill (seq_len=4) and decode (seq_len=1)."""
    kv_path = tmp_path / "kv.onnx"
    optimize(tiny_export(arch), f"kv:ctx_len={CTX}", output=kv_path)
    kv = OrtSession(kv_path, ctx_len=CTX)
    nodes_kv = len(ir.load(kv_path).graph)
    rng = np.random.default_rng(0)
    cache = {n: rng.standard_normal(x.shape).astype(np.float32) for n, x in zero_cache(kv, 2).items()}
    steps = {4: [[5, 6, 7, 8], [3, -1, -1, -1]], 1: [[9], [4]]}
    ids = {seq: rng.integers(1, 500, size=(2, seq)) for seq in steps}

    symbolic = tmp_path / "symbolic.onnx"
    result = optimize(kv_path, "fixed", output=symbolic)
    model = ir.load(symbolic)
    shape_reads = sorted(n.name for n in model.graph if n.op_type == "Shape")
    assert set(shape_reads) <= {"qeff_fixed/batch_size", "qeff_fixed/seq_len", "qeff_fixed/ctx_len"}
    assert "dims_unresolved" not in result.report.passes[-1].details
    _assert_dims_match_runtime(model, _kv_feeds(cache, ids[4], steps[4]), {"batch_size": 2, "seq_len": 4, "ctx_len": CTX})
    for seq, pos in steps.items():
        bound = tmp_path / f"fixed{seq}.onnx"
        optimize(kv_path, f"fixed:batch_size=2,seq_len={seq},ctx_len={CTX}", output=bound)
        static = ir.load(bound)
        assert _ops(static, "Shape") == 0
        assert _not_static(static) == []
        assert len(static.graph) < nodes_kv
        want_logits, want_cache = kv_step(kv, ids[seq], np.array(pos), cache)
        for path in (symbolic, bound):
            got_logits, got_cache = kv_step(OrtSession(path, ctx_len=CTX), ids[seq], np.array(pos), cache)
            np.testing.assert_allclose(got_logits, want_logits, atol=1e-6, rtol=0)
            for name in want_cache:
                np.testing.assert_allclose(got_cache[name], want_cache[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_plain_llama_export(tiny_export, tmp_path, exporter):
    """A plain export (batch/seq dims, attention_mask): symbols renamed, Shape arithmetic shared."""
    path = tiny_export("llama", exporter=exporter)
    out = tmp_path / "fixed.onnx"
    optimize(path, "fixed", output=out)
    plain, fixed = ir.load(path), ir.load(out)
    assert [d.value for d in fixed.graph.inputs[0].shape] == ["batch_size", "seq_len"]
    assert _ops(fixed, "Shape") <= 2 < _ops(plain, "Shape") or _ops(plain, "Shape") <= 2
    assert len(fixed.graph) <= len(plain.graph)
    rng = np.random.default_rng(3)
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, 4:] = 0
    feeds = {"input_ids": rng.integers(1, 500, size=(2, 6)), "attention_mask": mask,
             "position_ids": np.tile(np.arange(6), (2, 1))}
    np.testing.assert_array_equal(_session(fixed).run(None, feeds)[0], _session(plain).run(None, feeds)[0])
    _assert_dims_match_runtime(fixed, feeds, {"batch_size": 2, "seq_len": 6})


def _bert_feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": rng.integers(1, 500, size=(batch, seq)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, size=(batch, seq))}


def test_tiny_bert(tiny_bert_export, tmp_path):
    plain = ir.load(tiny_bert_export)
    symbolic = tmp_path / "symbolic.onnx"
    optimize(tiny_bert_export, "fixed:symbols=sequence_length", output=symbolic)
    bound = tmp_path / "bound.onnx"
    optimize(tiny_bert_export, "fixed:batch_size=2,sequence_length=8", output=bound)
    for path in (symbolic, bound):
        model = ir.load(path)
        assert _ops(model, "Trilu") == 0
        assert len(model.graph) < len(plain.graph)
    assert _ops(ir.load(symbolic), "Shape") <= 2
    assert _ops(ir.load(bound), "Shape") == 0 and _not_static(ir.load(bound)) == []
    for batch, seq in ((2, 8), (3, 5)):
        feeds = _bert_feeds(batch, seq, seed=seq)
        want = _session(plain).run(None, feeds)
        for path in (symbolic, bound) if (batch, seq) == (2, 8) else (symbolic,):
            for got, ref in zip(_session(ir.load(path)).run(None, feeds), want):
                np.testing.assert_array_equal(got, ref)
    _assert_dims_match_runtime(ir.load(symbolic), _bert_feeds(3, 5, 0), {"batch_size": 3, "sequence_length": 5})
