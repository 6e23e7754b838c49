"""The fixed pass (bound form): with every symbol bound the graph is static, has no Shape op,
and computes exactly what the symbolic graph computes for those sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.errors import PassOptionError
from qeff.passes import optimize
from qeff.passes.fixed import FixedPass
from qeff.passes.kv_runner import KVRunner
from tests.passes.test_kv import ARCHS, CTX


def _not_static(model: ir.Model) -> list[str]:
    return [o.name for n in model.graph for o in n.outputs
            if o.shape is None or any(not isinstance(d, int) for d in o.shape)]


def test_bound_reshape_target_folds():
    proto = onnx.parser.parse_model(
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
    model = ir.serde.deserialize_model(proto)
    FixedPass(FixedPass.Options(batch_size=3, seq_len=5))(model)
    assert [n.op_type for n in model.graph] == ["Reshape"]
    assert list(model.graph.outputs[0].shape) == [3, 5, 2, 4]
    assert _not_static(model) == []


def test_bad_bindings():
    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[batch, 8] x) => (float[batch, 8] y) { y = Relu(x) }"""
    )
    with pytest.raises(PassOptionError, match="no 'ctx_len' dimension"):
        FixedPass(FixedPass.Options(ctx_len=8))(ir.serde.deserialize_model(proto))
    with pytest.raises(PassOptionError, match="at least one symbol"):
        FixedPass(FixedPass.Options())(ir.serde.deserialize_model(proto))
    with pytest.raises(PassOptionError, match="at least 1"):
        FixedPass(FixedPass.Options(batch_size=0))(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_then_fixed_is_static_and_identical(tiny_export, tmp_path, arch):
    kv_path = tmp_path / "kv.onnx"
    optimize(tiny_export(arch), f"kv:ctx_len={CTX}", output=kv_path)
    kv = KVRunner(kv_path, CTX)
    nodes_kv = len(list(ir.load(kv_path).graph))
    rng = np.random.default_rng(0)
    cache = {n: rng.standard_normal(x.shape).astype(np.float32) for n, x in kv.new_cache(2).items()}
    for seq, pos in ((4, [[5, 6, 7, 8], [3, -1, -1, -1]]), (1, [[9], [4]])):
        out = tmp_path / f"fixed{seq}.onnx"
        optimize(kv_path, f"fixed:batch_size=2,seq_len={seq},ctx_len={CTX}", output=out)
        model = ir.load(out)
        assert not any(n.op_type == "Shape" for n in model.graph)
        assert _not_static(model) == []
        assert len(list(model.graph)) < nodes_kv
        ids = rng.integers(1, 500, size=(2, seq))
        want_logits, want_cache = kv.step(ids, np.array(pos), cache)
        got_logits, got_cache = KVRunner(out, CTX).step(ids, np.array(pos), cache)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-6, rtol=0)
        for name in want_cache:
            np.testing.assert_allclose(got_cache[name], want_cache[name], atol=1e-6, rtol=0)
