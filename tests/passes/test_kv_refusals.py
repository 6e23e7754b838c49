"""kv refuses a model whose per-step inputs (input_ids, position_ids, attention_mask) are not
plain graph inputs: the cache model must take them from the caller at every step."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff.errors import UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.passes.kv.kv_pass import KVPass

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 50, 16, 2, 1, 8, 32


def _decoder(position_ids: str = "input", dtype: int = TensorProto.INT64, rank: int = 2) -> onnx.ModelProto:
    """A one-layer decoder around a 3-D ONNX Attention node with a learned position table read
    by ``position_ids``, which is a graph input, an initializer, a ``Constant`` or a graph
    input with an initializer default."""
    rng = np.random.default_rng(0)
    shapes = {"emb": (VOCAB, HIDDEN), "wpe": (POSITIONS, HIDDEN), "wq": (HIDDEN, HEADS * HEAD_DIM),
              "wk": (HIDDEN, KV_HEADS * HEAD_DIM), "wv": (HIDDEN, KV_HEADS * HEAD_DIM), "wo": (HEADS * HEAD_DIM, VOCAB)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["wpe", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=HEADS, kv_num_heads=KV_HEADS, is_causal=1),
        helper.make_node("MatMul", ["a", "wo"], ["logits"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    fixed_positions = np.arange(6, dtype=np.int64).reshape(1, 6)
    if position_ids == "input":
        dims = ["batch", "seq"] if rank == 2 else [3, "batch", "seq"]
        inputs.append(helper.make_tensor_value_info("position_ids", dtype, dims))
    elif position_ids == "initializer":
        inits.append(numpy_helper.from_array(fixed_positions, "position_ids"))
    elif position_ids == "input_with_default":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 6]))
        inits.append(numpy_helper.from_array(fixed_positions, "position_ids"))
    elif position_ids == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["position_ids"], name="positions",
                                         value=numpy_helper.from_array(fixed_positions)))
    graph = helper.make_graph(nodes, "decoder", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _refused(model: ir.Model, pattern: str) -> None:
    before = (_ops(model), [v.name for v in model.graph.inputs], sorted(model.graph.initializers))
    with pytest.raises(UnsupportedGraphError, match=pattern):
        KVPass(ctx_len=16)(model)
    assert (_ops(model), [v.name for v in model.graph.inputs], sorted(model.graph.initializers)) == before


def test_the_decoder_with_a_position_input_is_rewritten(tmp_path):
    """The control: the same graph with position_ids as an input is accepted and generates
    what the original computes over the whole sequence."""
    from qeff.verify import verify_kv_model

    source = tmp_path / "decoder.onnx"
    onnx.save(_decoder("input"), source)
    kv_path = tmp_path / "decoder.kv.onnx"
    optimize(source, "kv:ctx_len=16", output=kv_path)
    assert [v.name for v in ir.load(kv_path).graph.inputs][:2] == ["input_ids", "position_ids"]
    result = verify_kv_model(source, kv_path, ctx_len=16)
    assert result.max_abs < 1e-5


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("initializer", r"kv: position_ids is an initializer \(INT64 \[1, 6\]\), not a graph input"),
        ("constant", r"kv: position_ids is the output of Constant node 'positions', not a graph input"),
        ("input_with_default", r"kv: position_ids is a graph input with a constant default, an initializer \(INT64 \[1, 6\]\)"),
    ],
)
def test_refuses_constant_position_ids(kind, pattern):
    _refused(ir.serde.deserialize_model(_decoder(kind)), pattern)


def test_refuses_position_ids_that_are_not_int64_or_not_batch_by_seq():
    _refused(ir.serde.deserialize_model(_decoder(dtype=TensorProto.INT32)), "kv: position_ids is INT32, not INT64")
    _refused(ir.serde.deserialize_model(_decoder(rank=3)), r"kv: position_ids has rank 3 \(\[3, .*not \[batch, seq\]")


def test_refusal_through_optimize_writes_nothing(tmp_path):
    source = tmp_path / "decoder.onnx"
    onnx.save(_decoder("constant"), source)
    with pytest.raises(UnsupportedGraphError, match="position_ids is the output of Constant"):
        optimize(source, "kv:ctx_len=16", output=tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]


def _replace_input(model: ir.Model, name: str, kind: str) -> None:
    """Take ``name`` out of the graph inputs and give the graph a constant of that name."""
    graph = model.graph
    value = next(v for v in graph.inputs if v.name == name)
    graph.inputs.remove(value)
    array = (np.arange(4)[None] if name == "position_ids" else np.ones((1, 4))).astype(np.int64)
    if kind == "initializer":
        value.const_value = ir.tensor(array, name=name)
        value.shape = ir.Shape(array.shape)
        graph.register_initializer(value)
    else:
        node = ir.node("Constant", [], attributes={"value": ir.tensor(array)}, name=f"{name}_constant")
        graph.insert_before(next(iter(graph)), node)
        ir.convenience.replace_all_uses_with(value, node.outputs[0])
        node.outputs[0].name = name


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["input_ids", "position_ids", "attention_mask"])
@pytest.mark.parametrize("kind", ["initializer", "constant"])
def test_refuses_exported_llama_with_a_constant_step_input(tiny_export, exporter, name, kind):
    path = tiny_export("llama", exporter=exporter)
    control = ir.load(path)
    KVPass(ctx_len=16)(control)  # the export itself is accepted
    model = ir.load(path)
    _replace_input(model, name, kind)
    found = "an initializer" if kind == "initializer" else f"the output of Constant node '{name}_constant'"
    _refused(model, rf"kv: {name} is {found}.*, not a graph input")
