"""Tests for the attention-site matcher, against facts known independently of it: the tiny
configs (2 layers, 4 heads, head_dim 16, KV heads per architecture) and the K/V that Hugging
Face's own cache holds after a forward pass."""

from __future__ import annotations

import inspect
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.passes.kv.match import explain_no_match, find_attention_sites

# KV heads of the tiny configs: GQA 2 for these, MQA for gemma and falcon (multi_query=True,
# new_decoder_architecture=False, so HF ignores num_kv_heads=4 and uses a single KV head).
N_KV = {
    "gpt2": 4, "llama": 2, "mistral": 2, "mixtral": 2, "qwen2": 2, "phi3": 2, "falcon": 1,
    "gptj": 4, "mpt": 4, "codegen": 4, "starcoder2": 2, "gemma": 1,
}
ARCHS = list(N_KV)
SCALE = 1.0 / math.sqrt(16)  # every tiny arch carries 0.25 as a constant; none folds it into weights


def _load(path) -> ir.Model:
    return ir.load(path)


def _check_sites(model: ir.Model, n_kv: int, kind: str = "decomposed") -> list:
    before = len(list(model.graph))
    sites = find_attention_sites(model)
    assert len(list(model.graph)) == before  # read-only
    assert [s.layer for s in sites] == [0, 1]
    for s in sites:
        assert s.kind == kind
        assert (s.n_heads, s.n_kv_heads, s.head_dim) == (4, n_kv, 16)
        assert s.scale == pytest.approx(SCALE)
        assert s.mask is not None and s.mask_node is not None
        if kind == "decomposed":
            assert s.score_matmul.op_type == "MatMul" and s.output_matmul.op_type == "MatMul"
            assert s.softmax.op_type == "Softmax"
            assert s.score_matmul.inputs[1] is s.key_for_scores
            assert s.output_matmul.inputs[1] is s.value_for_output
        else:
            assert s.attention_node.op_type == "Attention"
    return sites


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_dynamo_eager(tiny_export, arch):
    sites = _check_sites(_load(tiny_export(arch)), N_KV[arch])
    for s in sites:
        if arch == "mpt":
            assert len(s.bias) == 1  # ALiBi
            assert s.mask_node.op_type == "Where"  # masked_fill
        else:
            assert s.bias == []
            assert s.mask_node.op_type == "Add"
        perm = tuple(s.key_transposed_by.attributes["perm"].value)
        if arch in ("gpt2", "gptj", "codegen", "mpt"):
            # K never exists as [b,h,S,d]: [b,S,h,d] goes to [b,h,d,S] in one Transpose.
            assert s.key_layout == "bshd" and perm == (0, 2, 3, 1)
        else:
            assert s.key_layout == "bhsd" and perm == (0, 1, 3, 2)
        assert s.value_layout == "bhsd"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sites_torchscript(tiny_export, arch):
    sites = _check_sites(_load(tiny_export(arch, exporter="torchscript")), N_KV[arch])
    assert sites[1].key_layout == ("bshd" if arch == "gpt2" else "bhsd")


def test_sites_llama_sdpa(tiny_export):
    sites = _check_sites(_load(tiny_export("llama", opset=18, attn="sdpa")), 2)
    # sdpa multiplies q and k by sqrt(scale) each, and transposes K through a 3-D Transpose.
    assert tuple(sites[0].key_transposed_by.attributes["perm"].value) == (0, 2, 1)
    assert sites[0].query.producer().op_type == "Mul"


def test_sites_llama_sdpa_opset23(tiny_export):
    sites = _check_sites(_load(tiny_export("llama", opset=23, attn="sdpa")), 2, kind="attention_op")
    # K/V are the pre-repetition values, not the Attention node's (repeated) inputs.
    assert sites[0].key is not sites[0].key_for_scores
    assert sites[0].key.shape[1] == 2


def test_no_attention():
    proto = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18]>
        mlp (float[2, 8] x) => (float[2, 4] y) <float[8, 16] w1 = {0.0}, float[16, 4] w2 = {0.0}> {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }"""
    )
    model = ir.serde.deserialize_model(proto)
    assert find_attention_sites(model) == []
    assert "no Softmax" in explain_no_match(model)


def test_softmax_without_attention():
    proto = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18]>
        cls (float[2, 8] x) => (float[2, 8] y) {
            y = Softmax<axis = -1>(x)
        }"""
    )
    model = ir.serde.deserialize_model(proto)
    assert find_attention_sites(model) == []
    assert "MatMul" in explain_no_match(model)


# --- numerical check: key/value are the HF cache's K/V (pre-repetition, after RoPE) -------------


def _run_with_site_outputs(model: ir.Model, sites, feeds):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    names = []
    for s in sites:
        names += [s.key.name, s.value.name, s.query.name]
    existing = {o.name for o in proto.graph.output}
    for n in names:
        if n not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            existing.add(n)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    out = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return [out[i : i + 3] for i in range(0, len(out), 3)]


@pytest.mark.parametrize(
    "arch,exporter",
    [("llama", "dynamo"), ("gpt2", "dynamo"), ("phi3", "dynamo"), ("gptj", "dynamo"),
     ("falcon", "dynamo"), ("mpt", "dynamo"), ("gemma", "dynamo"), ("llama", "torchscript")],
)
def test_key_value_match_hf_cache(tiny_export, arch, exporter):
    import torch

    from qeff.frontend import build_tiny_model

    model = _load(tiny_export(arch, exporter=exporter))
    sites = find_attention_sites(model)
    assert len(sites) == 2

    b, S = 2, 7
    lengths = [7, 4]  # row 1 is right-padded
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 500, size=(b, S)).astype(np.int64)
    mask = np.zeros((b, S), dtype=np.int64)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), (b, S)).copy()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    got = _run_with_site_outputs(model, sites, feeds)

    tm = build_tiny_model(arch, seed=0).eval()
    kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=True)
    if "position_ids" in inspect.signature(tm.forward).parameters:
        kwargs["position_ids"] = torch.from_numpy(pos)
    with torch.no_grad():
        cache = tm(**kwargs).past_key_values
    for i, (k, v, q) in enumerate(got):
        s = sites[i]
        if s.key_layout == "bshd":
            k = k.transpose(0, 2, 1, 3)
        if s.value_layout == "bshd":
            v = v.transpose(0, 2, 1, 3)
        ref_k = cache.layers[i].keys.numpy()
        ref_v = cache.layers[i].values.numpy()
        assert k.shape == ref_k.shape == (b, N_KV[arch], S, 16)
        assert q.shape == (b, 4, S, 16)
        for r, n in enumerate(lengths):
            np.testing.assert_allclose(k[r, :, :n], ref_k[r, :, :n], atol=1e-4, rtol=0)
            np.testing.assert_allclose(v[r, :, :n], ref_v[r, :, :n], atol=1e-4, rtol=0)
