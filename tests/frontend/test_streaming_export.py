"""Streaming export of a checkpoint folder: same file as the in-memory export, and bad folders.

The models are the tiny configurations with hidden size 128, so that the matrices are above the
size up to which parameters are loaded for real and the streamed path (including the folded
transposes) is what writes them.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from qeff.errors import ExportError  # noqa: E402
from qeff.frontend import TINY_ARCHITECTURES, build_tiny_model, export_causal_lm, load_causal_lm  # noqa: E402
from qeff.frontend import streaming  # noqa: E402
from qeff.frontend.api import export_model  # noqa: E402
from qeff.frontend.inputs import padded_batch  # noqa: E402
from qeff.frontend.randomize import randomize_parameters  # noqa: E402
from qeff.frontend.safetensors_index import read_checkpoint  # noqa: E402
from qeff.frontend.streaming import StreamingUnsupported, build_skeleton, export_folder_streaming  # noqa: E402
from qeff.frontend.tiny import tiny_config  # noqa: E402


def _model(arch, seed=0):
    config = tiny_config(arch)
    fields = config.to_dict()
    for key in ("hidden_size", "n_embd", "d_model"):
        if key in fields:
            setattr(config, key, 128)
    if "intermediate_size" in fields:
        config.intermediate_size = 256
    if arch == "gemma":
        config.head_dim = 32
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return randomize_parameters(model, seed).eval()


def _save(model, folder, dtype="float32", shards=False):
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": "100KB"} if shards else {}))
    return folder


def _initializers(path):
    model = onnx.load(str(path))
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _logits(path):
    feeds = padded_batch(2, 7, 512, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {name: feeds[name].numpy() for name in wanted})[0]


def _assert_same_export(streamed, reference):
    want_model, want = _initializers(reference)
    got_model, got = _initializers(streamed)
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name
    assert [(n.op_type, list(n.input), list(n.output)) for n in got_model.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in want_model.graph.node
    ]
    np.testing.assert_array_equal(_logits(streamed), _logits(reference))


# (architecture, checkpoint dtype, sharded): every architecture whose checkpoint holds the
# model's own parameters (Mixtral's fused experts: test_streaming_converted.py), the dtypes and
# layouts spread so that each architecture meets a different one than in the TorchScript cases.
DYNAMO_CASES = [
    ("gpt2", "bfloat16", True),  # tied lm_head, Conv1D weights (Gemm)
    ("falcon", "float16", True),  # fused QKV, tied lm_head
    ("llama", "float16", False),
    ("mistral", "float32", False),
    ("qwen2", "bfloat16", True),  # q/k/v biases
    ("phi3", "bfloat16", False),  # fused qkv and gate_up projections
    ("gptj", "float32", True),  # partial rotary
    ("mpt", "float16", True),  # ALiBi: no position_ids
    ("codegen", "bfloat16", False),
    ("starcoder2", "float32", True),
    ("gemma", "float16", False),  # tied lm_head, embedding scale
]


def test_the_dynamo_cases_cover_every_streamed_architecture():
    assert sorted(case[0] for case in DYNAMO_CASES) == sorted(a for a in TINY_ARCHITECTURES if a != "mixtral")
    assert {case[1] for case in DYNAMO_CASES} == {"bfloat16", "float16", "float32"}
    assert {case[2] for case in DYNAMO_CASES} == {True, False}


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype", "shards"), DYNAMO_CASES, ids=[case[0] for case in DYNAMO_CASES])
def test_streamed_export_is_the_in_memory_export(tmp_path, monkeypatch, arch, dtype, shards):
    folder = _save(_model(arch), tmp_path / "hf", dtype, shards)
    assert (folder / "model.safetensors.index.json").is_file() == shards
    reference = export_causal_lm(load_causal_lm(folder), tmp_path / "memory" / "m.onnx", external_data=True,
                                 progress=False)
    # Small chunks: the blocked reads and the scattered writes of transposed weights run many times.
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 1000)
    result = export_folder_streaming(folder, tmp_path / "streamed" / "m.onnx", progress=False)
    assert result.architecture == arch
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["m.onnx", "m.onnx.data"]

    _assert_same_export(result.path, reference)


def test_export_model_streams_a_folder_and_checks_it(tmp_path, monkeypatch, caplog):
    folder = _save(_model("llama", seed=4), tmp_path / "hf")
    reference = export_model(source=folder, output=tmp_path / "memory" / "m.onnx", streaming=False,
                             external_data=True, check=False, progress=False)
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 1000)
    with caplog.at_level(logging.INFO, logger="qeff.frontend.streaming"):
        result = export_model(source=folder, output=tmp_path / "out" / "llama.onnx", progress=False)
    assert any("streaming llama" in r.getMessage() for r in caplog.records)
    assert result.architecture == "llama"
    assert result.inputs == ["input_ids", "attention_mask", "position_ids"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.num_parameters == reference.num_parameters
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["llama.onnx", "llama.onnx.data"]
    _assert_same_export(result.path, reference.path)


def test_skeleton_buffers_are_those_of_a_built_model(tmp_path):
    # Non-persistent buffers (rotary tables, embedding scales) are recomputed, not loaded.
    for arch in TINY_ARCHITECTURES:
        built = build_tiny_model(arch)
        folder = _save(built, tmp_path / arch)
        skeleton, large = build_skeleton(folder, read_checkpoint(folder))
        expected = dict(built.named_buffers())
        assert set(dict(skeleton.named_buffers())) == set(expected), arch
        for name, buffer in skeleton.named_buffers():
            assert torch.equal(buffer, expected[name]), (arch, name)
        assert large, arch  # at least the embedding is streamed
        # Tied weights stay one parameter.
        assert len(list(skeleton.parameters())) == len(list(built.parameters())), arch


def test_a_checkpoint_layout_that_cannot_be_mapped_is_not_streamed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save(build_tiny_model("mixtral"), tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    experts = "model.layers.1.block_sparse_moe.experts"

    # Expert 3 saved as number 4: transformers stacks experts in name order whatever their
    # numbers, so which slot is meant is not guessed here.
    renumbered = dict(weights)
    for w in ("w1", "w2", "w3"):
        renumbered[f"{experts}.4.{w}.weight"] = renumbered.pop(f"{experts}.3.{w}.weight")
    save_file(renumbered, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamingUnsupported, match=rf"not numbered 0, 1, 2, .* \('{experts}.4.w1.weight' comes at "):
        export_folder_streaming(folder, tmp_path / "out" / "m.onnx", progress=False)

    # A parameter whose pieces are under names that neither the model nor transformers' mapping know.
    unknown = dict(weights)
    for e in range(4):
        unknown[f"{experts}.{e}.w2_v0.weight"] = unknown.pop(f"{experts}.{e}.w2.weight")
    save_file(unknown, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamingUnsupported, match=r"stores 'model.layers.1.mlp.experts.down_proj' in another layout"):
        export_folder_streaming(folder, tmp_path / "out" / "m.onnx", progress=False)
    assert not (tmp_path / "out").exists()


def _refused(folder, output_dir, match):
    with pytest.raises(ExportError, match=match) as info:
        export_model(source=folder, output=output_dir / "m.onnx", progress=False, check=False)
    assert "\n" not in str(info.value) and info.value.hint
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.fixture
def sharded(tmp_path):
    return _save(build_tiny_model("llama", seed=1), tmp_path / "hf", shards=True)


def test_missing_shard(tmp_path, sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    _refused(sharded, tmp_path / "out", f"shard '{shard}' named in model.safetensors.index.json is missing")


def test_truncated_shard(tmp_path, sharded):
    shard = sorted(sharded.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    _refused(sharded, tmp_path / "out", f"{shard.name} is truncated")
    shard.write_bytes(data[:5])
    _refused(sharded, tmp_path / "out", "too short")


def test_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save(build_tiny_model("llama", seed=1), tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    original = dict(weights)

    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(folder, tmp_path / "out", r"'model.layers.1.mlp.up_proj.weight' has shape \[64, 128\]")

    weights = dict(original)
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(folder, tmp_path / "out", "no tensor 'model.norm.weight'")

    weights = dict(original)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].to(torch.int32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(folder, tmp_path / "out", "'model.embed_tokens.weight' is I32")
