"""Loading a causal LM from a local save_pretrained folder, and the errors for bad folders."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qeff.errors import ExportError  # noqa: E402
from qeff.frontend import (  # noqa: E402
    build_tiny_model,
    compare_with_onnxruntime,
    export_causal_lm,
    export_model,
    load_causal_lm,
)


def _same_logits(a, b):
    input_ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a(input_ids=input_ids).logits, b(input_ids=input_ids).logits)


def test_load_single_file_then_export(tmp_path):
    original = build_tiny_model("llama", seed=2)
    original.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    loaded = load_causal_lm(tmp_path / "hf")
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert _same_logits(original, loaded)

    path = export_causal_lm(loaded, tmp_path / "out" / "llama.onnx", exporter="torchscript", progress=False)
    # Against the in-memory model the folder was written from, not the reloaded one.
    assert compare_with_onnxruntime(original, path) <= 1e-4


@pytest.mark.slow
def test_load_sharded_through_export_model(tmp_path):
    original = build_tiny_model("qwen2", seed=3)
    original.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    assert _same_logits(original, load_causal_lm(tmp_path / "hf"))
    result = export_model(source=tmp_path / "hf", output=tmp_path / "qwen2.onnx", progress=False)
    assert result.architecture == "qwen2"
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert compare_with_onnxruntime(original, result.path) <= 1e-4


def test_loaded_mixture_of_experts_still_exports(tmp_path):
    # config.json does not record experts_implementation, so a reloaded Mixtral gets the default
    # grouped_mm kernel, which neither exporter can lower: the export must switch it for itself.
    original = build_tiny_model("mixtral", seed=0)
    original.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = load_causal_lm(tmp_path / "hf")
    assert loaded.config._experts_implementation == "grouped_mm"
    path = export_causal_lm(loaded, tmp_path / "mixtral.onnx", exporter="torchscript", progress=False)
    assert loaded.config._experts_implementation == "grouped_mm"  # restored afterwards
    assert compare_with_onnxruntime(original, path) <= 1e-4


def _one_line_error(folder, match):
    with pytest.raises(ExportError, match=match) as info:
        load_causal_lm(folder)
    assert "\n" not in str(info.value)
    assert info.value.hint
    return info.value


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _one_line_error(tmp_path, "no config.json")


def test_folder_without_weights(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    _one_line_error(tmp_path, "no \\*.safetensors weights")


def test_pickled_weights_are_refused_with_a_hint(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "safetensors" in _one_line_error(tmp_path, "no \\*.safetensors weights").hint


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    _one_line_error(file, "is not a folder")
    _one_line_error(tmp_path / "missing", "is not a folder")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    _one_line_error(tmp_path, "unknown model type 'not-a-model'")


def test_broken_weights_are_an_export_error(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    _one_line_error(tmp_path, "loading llama from")
