"""The kv pass against Hugging Face: greedy tokens, logits at every step and the cache contents
must equal what transformers' own ``generate`` (greedy, with its cache) produces on the same
weights. Nothing here compares the pass's output with itself."""

from __future__ import annotations

import json

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.errors import PassOptionError, QeffError, UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.passes.kv.kv_pass import KVPass
from qeff.runtime import OrtSession
from tests.kv_drive import kv_generate, kv_step, zero_cache

ARCHS = ["gpt2", "llama", "mistral", "mixtral", "qwen2", "phi3", "falcon", "gptj", "mpt", "codegen",
         "starcoder2", "gemma"]
N_KV = {"gpt2": 4, "llama": 2, "mistral": 2, "mixtral": 2, "qwen2": 2, "phi3": 2, "falcon": 1,
        "gptj": 4, "mpt": 4, "codegen": 4, "starcoder2": 2, "gemma": 1}
CTX = 40
NEW_TOKENS = 25  # the token chosen from the prefill logits, then 24 decode steps
LENGTHS = (8, 5)


def _prompts(lengths=LENGTHS, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 500, size=n).tolist() for n in lengths]


def _kv(path, tmp_path, name="kv", **options) -> str:
    spec = "kv:" + ",".join(f"{k}={v}" for k, v in {"ctx_len": CTX, **options}.items())
    out = tmp_path / f"{name}.onnx"
    optimize(path, spec, output=out)
    return str(out)


@functools.lru_cache(maxsize=None)
def _torch_model(arch: str, attn: str = "eager"):
    from qeff.frontend import build_tiny_model

    model = build_tiny_model(arch, seed=0, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # generate all tokens; never stop early
    model.generation_config.pad_token_id = 0
    return model


def _hf_generate(arch: str, prompt: list[int], attn: str = "eager"):
    """HF greedy generation with its cache: (tokens, per-step logits)."""
    import torch

    model = _torch_model(arch, attn)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True, use_cache=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = [x[0].float().numpy() for x in out.logits]
    return tokens, logits


def _hf_cache(arch: str, prompt: list[int]):
    import torch

    model = _torch_model(arch)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = model(ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    return [(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in cache.layers]


def _check_against_hf(kv_path, arch, attn="eager", lengths=LENGTHS, atol=1e-4, prefill_cache=False):
    prompts = _prompts(lengths)
    got = kv_generate(kv_path, prompts, NEW_TOKENS, ctx_len=CTX, chunk=4, prefill_cache=prefill_cache)
    for r, prompt in enumerate(prompts):
        ref_tokens, ref_logits = _hf_generate(arch, prompt, attn)
        assert got.tokens[r] == ref_tokens, f"prompt {r}: tokens differ from HF generate"
        assert len(got.logits[r]) == len(ref_logits) == NEW_TOKENS
        for step, (a, b) in enumerate(zip(got.logits[r], ref_logits)):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"prompt {r} step {step}")
    return prompts, got


# --- acceptance: every architecture, fp32 -----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_matches_hf(tiny_export, tmp_path, arch):
    kv_path = _kv(tiny_export(arch), tmp_path)
    prompts, got = _check_against_hf(kv_path, arch, prefill_cache=True)

    # The retained cache after prefill equals HF's cache slot by slot; slots no valid token
    # reached (the short prompt's pads) are untouched.
    for r, prompt in enumerate(prompts):
        n = len(prompt)
        for i, (ref_k, ref_v) in enumerate(_hf_cache(arch, prompt)):
            k = got.cache_after_prefill[f"past_key.{i}"]
            v = got.cache_after_prefill[f"past_value.{i}"]
            assert k.shape == (2, N_KV[arch], CTX, 16)
            np.testing.assert_allclose(k[r, :, :n], ref_k, atol=1e-4, rtol=0)
            np.testing.assert_allclose(v[r, :, :n], ref_v, atol=1e-4, rtol=0)
            assert not k[r, :, n:].any() and not v[r, :, n:].any()


@pytest.mark.parametrize(
    "arch,exporter,opset,attn",
    [
        ("gpt2", "torchscript", None, "eager"),
        ("llama", "torchscript", None, "eager"),
        ("llama", "torchscript", 17, "eager"),  # dynamo writes opset 18 at the least
        ("llama", "dynamo", 20, "eager"),
        ("llama", "dynamo", 18, "sdpa"),
        ("llama", "dynamo", 23, "sdpa"),
        ("llama", "dynamo", 24, "sdpa"),
        ("gpt2", "dynamo", 18, "sdpa"),
    ],
)
def test_exporters_opsets_and_sdpa(tiny_export, tmp_path, arch, exporter, opset, attn):
    kv_path = _kv(tiny_export(arch, exporter=exporter, opset=opset, attn=attn), tmp_path)
    _check_against_hf(kv_path, arch, attn)


def test_dynamic_cache_export_is_converted(tiny_export, tmp_path):
    source = ir.load(tiny_export("llama", with_past=True))
    assert [v.name for v in source.graph.inputs][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert sum(n.op_type == "Concat" and n.outputs[0].is_graph_output() for n in source.graph) == 4
    kv_path = _kv(tiny_export("llama", with_past=True), tmp_path)
    model = ir.load(kv_path)
    assert [v.name for v in model.graph.inputs] == [
        "input_ids", "position_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert not any(v.name.startswith("present") for v in model.graph.outputs)
    _check_against_hf(kv_path, "llama")


# --- the interface ----------------------------------------------------------------------------


def test_interface_is_the_contract(tiny_export, tmp_path):
    model = ir.load(_kv(tiny_export("llama"), tmp_path))
    ins = [(v.name, v.dtype, [d if isinstance(d, int) else d.value for d in v.shape]) for v in model.graph.inputs]
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    cache = ["batch_size", 2, "ctx_len", 16]
    assert ins == [
        ("input_ids", i64, ["batch_size", "seq_len"]),
        ("position_ids", i64, ["batch_size", "seq_len"]),
        ("past_key.0", f32, cache), ("past_value.0", f32, cache),
        ("past_key.1", f32, cache), ("past_value.1", f32, cache),
    ]
    outs = [(v.name, [d if isinstance(d, int) else d.value for d in v.shape]) for v in model.graph.outputs]
    assert outs == [
        ("logits", ["batch_size", 1, 512]),
        ("past_key.0_RetainedState", cache), ("past_value.0_RetainedState", cache),
        ("past_key.1_RetainedState", cache), ("past_value.1_RetainedState", cache),
    ]
    ops = [n.op_type for n in model.graph]
    assert ops.count("ScatterND") == 4
    assert "attention_mask" not in {v.name for v in model.graph.inputs}


def test_scatter_indices_stay_in_range_with_pads(tiny_export, tmp_path):
    """A row whose last valid position is ctx_len-1 still gets in-range pad slots, and a
    fully padded row changes nothing (onnxruntime would reject an out-of-range index)."""
    session = OrtSession(_kv(tiny_export("llama"), tmp_path), ctx_len=CTX)
    cache = zero_cache(session, 2)
    rng = np.random.default_rng(0)
    for name in cache:
        cache[name] = rng.standard_normal(cache[name].shape).astype(np.float32)
    ids = np.array([[5, 6, 7, 8], [9, 0, 0, 0]])
    pos = np.array([[CTX - 1, -1, -1, -1], [-1, -1, -1, -1]])
    logits, new = kv_step(session, ids, pos, cache)
    assert np.isfinite(logits).all()
    for name in cache:
        changed = np.argwhere(np.any(new[name] != cache[name], axis=-1))
        # Only row 0 at slot ctx_len-1 was written.
        assert {(int(r), int(s)) for r, _, s in changed} == {(0, CTX - 1)}


def test_fully_padded_chunk(tiny_export, tmp_path):
    """Prompts of 9 and 2 tokens in chunks of 4: the short row is all pads in two chunks."""
    _check_against_hf(_kv(tiny_export("llama"), tmp_path), "llama", lengths=(9, 2))


def test_continuous_batching_reuses_a_dirty_row(tiny_export, tmp_path):
    path = _kv(tiny_export("llama"), tmp_path, continuous_batching="true")
    model = ir.load(path)
    assert model.graph.inputs[-1].name == "batch_index"
    assert model.graph.inputs[2].shape[0].value == "full_batch_size"
    # Three cache rows; generate() fills the slots in order, so the long prompt takes slot 0.
    session = OrtSession(path, ctx_len=CTX, full_batch_size=3)
    long_prompt, other, third, short_prompt = _prompts((12, 6, 3, 5), seed=7)

    used = kv_generate(None, [long_prompt, other, third], 10, session=session).cache
    assert used["past_key.0"][0, :, 12:21].any()  # slot 0 holds K/V beyond the next prompt's length
    # The next prompt goes into the first free slot, 0: dirty beyond its length.
    reused = kv_generate(None, [short_prompt], 16, session=session, reset=False)
    fresh = kv_generate(None, [short_prompt], 16, session=OrtSession(path, ctx_len=CTX, full_batch_size=3))
    assert reused.tokens == fresh.tokens
    for a, b in zip(reused.logits[0], fresh.logits[0]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    hf_tokens, _ = _hf_generate("llama", short_prompt)
    assert reused.tokens[0] == hf_tokens[:16]
    for name in used:  # the other rows were not touched
        np.testing.assert_array_equal(reused.cache[name][[1, 2]], used[name][[1, 2]])


# --- options ----------------------------------------------------------------------------------


def test_kv_dtype_float16(tiny_export, tmp_path):
    path = _kv(tiny_export("llama"), tmp_path, kv_dtype="float16")
    model = ir.load(path)
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.inputs[2:])
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.outputs[1:])
    prompts = _prompts()
    got = kv_generate(path, prompts, NEW_TOKENS, ctx_len=CTX)
    for r, prompt in enumerate(prompts):
        ref_tokens, ref_logits = _hf_generate("llama", prompt)
        agree = sum(a == b for a, b in zip(got.tokens[r], ref_tokens))
        assert agree >= NEW_TOKENS - 1
        np.testing.assert_allclose(got.logits[r][0], ref_logits[0], atol=5e-3, rtol=0)


def test_logits_all(tiny_export, tmp_path):
    import torch

    path = _kv(tiny_export("gpt2"), tmp_path, logits="all")
    session = OrtSession(path, ctx_len=CTX)
    prompt = _prompts((6,))[0]
    ids = np.array([prompt])
    logits, _ = kv_step(session, ids, np.arange(6)[None])
    assert logits.shape == (1, 6, 512)
    with torch.no_grad():
        ref = _torch_model("gpt2")(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


# --- refusals ---------------------------------------------------------------------------------


def test_refuses_graph_without_attention():
    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 18]>
        bag (int64[b, s] input_ids) => (float[b, s, 4] logits)
        <float[16, 8] emb = {0.0}, float[8, 4] head = {0.0}> {
            h = Gather(emb, input_ids)
            logits = MatMul(h, head)
        }"""
    )
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(UnsupportedGraphError, match="no attention found: no Softmax"):
        KVPass(KVPass.Options(ctx_len=16))(model)
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul"]


def test_refuses_a_model_with_a_static_cache(tiny_export, tmp_path):
    model = ir.load(_kv(tiny_export("llama"), tmp_path))
    model.metadata_props.clear()  # no pass history: the graph itself must give it away
    before = len(list(model.graph))
    with pytest.raises(UnsupportedGraphError, match="already has a static KV cache"):
        KVPass(KVPass.Options(ctx_len=CTX))(model)
    assert len(list(model.graph)) == before


def test_refuses_missing_ctx_len(tiny_export):
    model = ir.load(tiny_export("llama"))
    with pytest.raises(PassOptionError, match="ctx_len"):
        KVPass(KVPass.Options())(model)


def test_position_table_bounds_ctx_len(tiny_export):
    from qeff.frontend import tiny_config

    rows = tiny_config("gpt2").n_positions
    model = ir.load(tiny_export("gpt2"))
    with pytest.raises(PassOptionError, match="position table"):
        KVPass(KVPass.Options(ctx_len=rows + 1))(model)
    result = KVPass(KVPass.Options())(ir.load(tiny_export("gpt2")))  # implied by the table
    assert result.modified


def test_refuses_prompt_longer_than_ctx_len(tiny_export, tmp_path):
    session = OrtSession(_kv(tiny_export("llama"), tmp_path), ctx_len=CTX)
    with pytest.raises(QeffError, match="does not fit"):
        kv_generate(None, [list(range(1, CTX + 2))], 1, session=session)
    with pytest.raises(QeffError, match="do not fit"):
        kv_generate(None, [list(range(1, 30))], 20, session=session)


def test_refuses_an_unrecognised_layer_naming_it(tiny_export):
    model = ir.load(tiny_export("llama"))
    softmax = [n for n in model.graph if n.op_type == "Softmax"][1]
    odd = ir.node("Sin", [softmax.inputs[0]])  # layer 1's scores no longer come from a MatMul
    model.graph.insert_before(softmax, odd)
    softmax.replace_input_with(0, odd.outputs[0])
    before = [n.op_type for n in model.graph]
    with pytest.raises(UnsupportedGraphError, match=r"layer 1: attention not recognised: .*Sin"):
        KVPass(KVPass.Options(ctx_len=CTX))(model)
    assert [n.op_type for n in model.graph] == before


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_sliding_window_matches_hf_mistral(tmp_path, exporter):
    """Mistral with a 6-token window: the kv mask (c > p - window) must reproduce HF's
    sliding-window attention once the sequence is longer than the window. The window is read
    from the export's mask; the sliding_window option gives the same model."""
    import torch
    import transformers

    from qeff.frontend import export_causal_lm, randomize_parameters, tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 6
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_parameters(model, 0)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    path = export_causal_lm(model, tmp_path / "mistral-sw.onnx", exporter=exporter, external_data=False,
                            progress=False)
    read = _kv(path, tmp_path, name="read")
    manifest = json.loads((tmp_path / "read.qeff.json").read_text())
    assert manifest["kv"]["visibility"] == ["sliding window 6"] * 2
    prompts = _prompts()
    got = kv_generate(read, prompts, 12, ctx_len=CTX)
    given = kv_generate(_kv(path, tmp_path, sliding_window=6), prompts, 12, ctx_len=CTX)
    assert given.tokens == got.tokens
    # an override wider than the cache: no window at all
    windowless = kv_generate(_kv(path, tmp_path, name="nowindow", sliding_window=1000), prompts, 12, ctx_len=CTX)
    for r, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        assert got.tokens[r] == out.sequences[0, len(prompt):].tolist()
        for a, b in zip(got.logits[r], out.logits):
            np.testing.assert_allclose(a, b[0].numpy(), atol=1e-4, rtol=0)
        # The window matters here: without it the logits differ.
        assert np.abs(windowless.logits[r][-1] - got.logits[r][-1]).max() > 1e-3


@pytest.mark.parametrize("after_head", [None, "Relu"])
def test_three_d_attention_node_with_gqa(tmp_path, after_head):
    """A hand-built decoder around a 3-D ONNX Attention node (q_num_heads=2, kv_num_heads=1,
    is_causal=1, no mask and no position_ids input): the KV model must generate what
    onnxruntime's own Attention computes over the whole sequence. With an op after the lm_head
    that is not known to act per token, the last token is gathered from the logits instead."""
    from onnx import TensorProto, helper, numpy_helper

    from qeff.verify import verify_kv_model

    rng = np.random.default_rng(0)
    vocab, hidden, heads, kv_heads, head_dim = 50, 16, 2, 1, 8
    shapes = {"emb": (vocab, hidden), "wq": (hidden, heads * head_dim), "wk": (hidden, kv_heads * head_dim),
              "wv": (hidden, kv_heads * head_dim), "wo": (heads * head_dim, vocab)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=heads, kv_num_heads=kv_heads, is_causal=1),
        helper.make_node("MatMul", ["a", "wo"], ["logits" if after_head is None else "scores"]),
    ]
    if after_head is not None:
        nodes.append(helper.make_node(after_head, ["scores"], ["logits"]))
    graph = helper.make_graph(
        nodes, "attention3d", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10))
    source = tmp_path / "attention3d.onnx"
    onnx.save(proto, source)
    kv_path = tmp_path / "attention3d.kv.onnx"
    optimize(source, "kv:ctx_len=24", output=kv_path)
    kv_model = ir.load(kv_path)
    assert [v.name for v in kv_model.graph.inputs][:3] == ["input_ids", "position_ids", "past_key.0"]
    logits = kv_model.graph.outputs[0]
    assert logits.name == "logits" and [d if isinstance(d, int) else d.value for d in logits.shape] == [
        "batch_size", 1, vocab]
    producer = logits.producer()
    if after_head is None:  # gathered before the lm_head, which then runs on one token
        assert producer.op_type == "MatMul" and producer.inputs[0].producer().op_type == "GatherND"
    else:
        assert producer.op_type == "GatherND" and producer.inputs[0].producer().op_type == after_head
    result = verify_kv_model(source, kv_path, ctx_len=24)
    assert result.token_agreement == "32/32" and result.max_abs < 1e-5


# --- cost: one match, a weight-free shape inference, no torch ----------------------------------


def test_one_match_and_a_weight_free_shape_inference_per_call(tiny_export, monkeypatch):
    """A TorchScript export has no value shapes, so the matcher needs shape inference. One kv
    call runs the matcher once, serialises the model once, and hands onnx's shape inference a
    protobuf without the weights."""
    import onnx_ir.serde

    from qeff.passes.kv import match

    runs, serialised, inferred = [], [], []
    real_run, real_serialize, real_infer = match._Matcher.run, onnx_ir.serde.serialize_model, onnx.shape_inference.infer_shapes
    monkeypatch.setattr(match._Matcher, "run", lambda self: runs.append(1) or real_run(self))
    monkeypatch.setattr(onnx_ir.serde, "serialize_model", lambda m: serialised.append(1) or real_serialize(m))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        lambda proto, *a, **k: inferred.append(proto) or real_infer(proto, *a, **k))
    model = ir.load(tiny_export("llama", exporter="torchscript"))
    assert max(v.const_value.nbytes for v in model.graph.initializers.values()) > 16_000
    KVPass(KVPass.Options(ctx_len=CTX))(model)
    assert len(runs) == 1
    assert len(serialised) <= 1 and len(inferred) == 1
    sizes = [len(t.raw_data) or 4 * len(t.float_data) for t in inferred[0].graph.initializer]
    assert max(sizes) <= 1024, "shape inference was given the weights"


def test_kv_does_not_import_torch(tiny_export):
    """The passes never import torch (onnxruntime.tools' package __init__ does: +3.6 s, +0.23 GB)."""
    import subprocess
    import sys

    path = tiny_export("llama", exporter="torchscript")
    script = (
        "import sys, onnx_ir as ir\n"
        "from qeff.passes import KVPass, run_passes\n"
        f"run_passes(ir.load({str(path)!r}), [KVPass(ctx_len={CTX})])\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
