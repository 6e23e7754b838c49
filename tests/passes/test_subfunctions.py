"""The subfunctions pass: the outlined model must compute what the flat model computes, bit for
bit (onnxruntime on both, the same inputs), on every tiny architecture; hand-built models whose
layers differ keep the odd layer inline (or get one function per kind) and say so.

onnxruntime runs at its basic optimisation level: its extended level fuses a residual ``Add``
with the next ``LayerNormalization`` (``SkipLayerNormalization``) in the flat graph but not
across a call boundary, which moves the last bit of LayerNorm models; the graph is the same.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from qeff.common.onnxrt import onnxruntime_session
from qeff.optimizer import optimize
from qeff.passes import run_passes
from qeff.passes.ir.sample_inputs import sample_inputs
from qeff.passes.subfunctions.outline import DOMAIN

# Every architecture once; both exporters and the three pipeline states spread over them.
# TorchScript runs on the architectures the rest of the suite already exports that way.
CASES = [
    ("gpt2", "torchscript", ""), ("gpt2", "torchscript", "kv,fixed"), ("llama", "torchscript", "kv"),
    ("llama", "dynamo", "kv,fixed"), ("mistral", "dynamo", ""), ("mixtral", "dynamo", "kv"),
    ("qwen2", "dynamo", "kv,fixed"), ("phi3", "dynamo", ""), ("falcon", "dynamo", "kv"),
    ("gptj", "dynamo", "kv,fixed"), ("mpt", "dynamo", ""), ("codegen", "dynamo", "kv"),
    ("starcoder2", "dynamo", "kv,fixed"), ("gemma", "dynamo", "kv"),
]


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnxruntime_session(ir.to_proto(model).SerializeToString(), level=1)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _assert_bit_equal(flat: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    assert list(out) == list(flat)
    for name, expected in flat.items():
        assert out[name].dtype == expected.dtype and out[name].shape == expected.shape, name
        assert np.array_equal(out[name].view(np.uint8), expected.view(np.uint8)), name


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter,pipeline", CASES, ids=[f"{a}-{e}-{p or 'plain'}" for a, e, p in CASES])
def test_outlined_model_is_bit_exact(tiny_export, arch, exporter, pipeline):
    model = ir.load(tiny_export(arch, exporter=exporter))
    if pipeline:
        run_passes(model, pipeline.replace("kv", "kv:ctx_len=40"))
    feeds = sample_inputs(model, dims={"batch_size": 1, "batch": 1}, seed=3)
    inputs, outputs = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    flat = _run(model, feeds)

    result = run_passes(model, "subfunctions")

    details = result.report.passes[-1].details
    assert list(details["functions"]) == ["DecoderLayer"]
    assert details["functions"]["DecoderLayer"]["calls"] == 2 and "inline" not in details
    assert details["nodes_after"] < details["nodes_before"]
    assert details["onnx_bytes_after"] < details["onnx_bytes_before"]
    assert result.manifest.subfunctions["functions"] == {"DecoderLayer": {"layers": [0, 1]}}
    calls = [n for n in model.graph if n.domain == DOMAIN]
    assert len(calls) == 2
    assert [v.name for v in model.graph.inputs] == inputs and [v.name for v in model.graph.outputs] == outputs
    _assert_bit_equal(flat, _run(model, feeds))


# --- hand-built layers ----------------------------------------------------------------------

def _layered(kinds: list[str], seed: int = 0) -> tuple[onnx.ModelProto, list[str]]:
    """A residual stack: layer i is ``x + act(MatMul(x - mean(x), w_i)) * s_i`` named
    ``/layers.i/...``; ``kinds[i]`` picks the activation (``Sigmoid``/``Relu``/``Tanh``), and
    ``"Reshape"`` adds a Reshape whose target differs from the others'."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], [numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    x = "x"
    for i, kind in enumerate(kinds):
        p = f"/layers.{i}"
        inits += [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.array(0.5 + i, np.float32), f"s{i}")]
        nodes += [helper.make_node("ReduceMean", [x, "axes"], [f"{p}/mean"], name=f"{p}/ReduceMean"),
                  helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centred"], name=f"{p}/Sub"),
                  helper.make_node("MatMul", [f"{p}/centred", f"w{i}"], [f"{p}/mm"], name=f"{p}/MatMul")]
        act_in = f"{p}/mm"
        if kind == "Reshape":
            inits.append(numpy_helper.from_array(np.array([-1, 2, 4], np.int64), f"shape{i}"))
            inits.append(numpy_helper.from_array(np.array([-1, 8], np.int64), f"back{i}"))
            nodes += [helper.make_node("Reshape", [act_in, f"shape{i}"], [f"{p}/r"], name=f"{p}/Reshape"),
                      helper.make_node("Reshape", [f"{p}/r", f"back{i}"], [f"{p}/rb"], name=f"{p}/Reshape_1")]
            act_in, kind = f"{p}/rb", "Sigmoid"
        nodes += [helper.make_node(kind, [act_in], [f"{p}/act"], name=f"{p}/{kind}"),
                  helper.make_node("Mul", [f"{p}/act", f"s{i}"], [f"{p}/scaled"], name=f"{p}/Mul"),
                  helper.make_node("Add", [x, f"{p}/scaled"], [f"{p}/out"], name=f"{p}/Add")]
        x = f"{p}/out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="final"))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model, kinds


def _outline(proto: onnx.ModelProto, **options):
    model = ir.serde.deserialize_model(proto)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    flat = _run(model, feeds)
    spec = "subfunctions" + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    result = run_passes(model, spec)
    _assert_bit_equal(flat, _run(model, feeds))
    return model, result.report.passes[-1].details, result.manifest


def test_the_odd_layer_stays_inline_and_is_reported():
    model, details, manifest = _outline(_layered(["Sigmoid", "Sigmoid", "Relu", "Sigmoid"])[0])
    assert details["functions"]["DecoderLayer"]["calls"] == 3
    assert details["functions"]["DecoderLayer"]["layers"] == "0-1,3"
    assert set(details["inline"]) == {"2"}
    assert "not isomorphic" in details["inline"]["2"] and "Relu" in details["inline"]["2"]
    assert manifest.subfunctions["functions"]["DecoderLayer"]["layers"] == [0, 1, 3]
    # the odd layer's nodes are still in the main graph
    assert any(n.op_type == "Relu" for n in model.graph)
    # weights and the per-layer scale are inputs; the shared reduction axes are in the body
    function = next(iter(model.functions.values()))
    mean = next(n for n in function if n.op_type == "ReduceMean")
    assert mean.inputs[1].producer() is not None and mean.inputs[1].producer().op_type == "Constant"
    assert len(function.inputs) == 3  # the stream, the weight, the scale


def test_two_kinds_get_two_functions():
    model, details, _ = _outline(_layered(["Sigmoid", "Tanh", "Sigmoid", "Tanh"])[0])
    assert {name: f["layers"] for name, f in details["functions"].items()} == \
        {"DecoderLayer0": "0,2", "DecoderLayer1": "1,3"}
    assert "inline" not in details
    assert len(model.functions) == 2


def test_a_different_integer_constant_is_a_different_kind():
    _, details, _ = _outline(_layered(["Sigmoid", "Sigmoid", "Reshape"])[0])
    assert details["functions"]["DecoderLayer"]["layers"] == "0-1"
    assert "2" in details["inline"]


def test_min_calls_keeps_a_small_kind_inline():
    _, details, _ = _outline(_layered(["Sigmoid", "Sigmoid", "Tanh", "Tanh", "Tanh"])[0], min_calls=3)
    assert {name: f["layers"] for name, f in details["functions"].items()} == {"DecoderLayer": "2-4"}
    assert set(details["inline"]) == {"0", "1"}


def test_a_model_without_layers_is_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    result = run_passes(model, "subfunctions")
    assert result.report.passes[-1].details["functions"] == {}
    assert not result.report.passes[-1].modified and not model.functions
    assert result.manifest.subfunctions is None


def test_no_pass_runs_after_subfunctions(tiny_export, tmp_path):
    from qeff.errors import PassSequenceError

    with pytest.raises(PassSequenceError, match="pass 'fixed' cannot run after 'subfunctions', which must be the last"):
        optimize(tiny_export("llama"), "kv:ctx_len=32,subfunctions,fixed", tmp_path / "a.onnx")
    outlined = optimize(tiny_export("llama"), "kv:ctx_len=32,subfunctions", tmp_path / "b.onnx").output
    with pytest.raises(PassSequenceError, match="cannot run after 'subfunctions'"):
        optimize(outlined, "fp16clip", tmp_path / "c.onnx")
