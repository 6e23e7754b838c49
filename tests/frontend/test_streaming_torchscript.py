"""Streaming export with the TorchScript exporter: the same file as its in-memory export.

Every tiny architecture whose checkpoint holds the model's own parameters (all but Mixtral), at
hidden size 128 so that the matrices are streamed; the checkpoint dtypes and the single-file and
sharded layouts are spread over the architectures.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from qeff.frontend import (  # noqa: E402
    TINY_ARCHITECTURES,
    build_tiny_model,
    compare_with_onnxruntime,
    export_causal_lm,
    load_causal_lm,
)
from qeff.frontend import streaming  # noqa: E402
from qeff.frontend.api import export_model  # noqa: E402
from qeff.frontend.streaming import export_folder_streaming  # noqa: E402
from tests.frontend.test_streaming_export import _assert_same_export, _model, _save  # noqa: E402

# (architecture, checkpoint dtype, sharded, opset)
CASES = [
    ("gpt2", "bfloat16", True, None),  # tied lm_head, Conv1D weights (Gemm)
    ("llama", "float32", False, 17),  # an opset the dynamo exporter does not write
    ("mistral", "float16", True, None),
    ("qwen2", "bfloat16", False, None),  # q/k/v biases
    ("phi3", "float32", True, None),  # fused qkv and gate_up projections
    ("falcon", "float16", False, None),  # fused QKV, tied lm_head
    ("gptj", "bfloat16", True, None),  # partial rotary
    ("mpt", "float32", False, None),  # ALiBi: no position_ids
    ("codegen", "float16", True, None),
    ("starcoder2", "bfloat16", False, None),
    ("gemma", "float32", True, None),  # tied lm_head, embedding scale
]


def test_the_cases_cover_every_streamed_architecture():
    assert sorted(case[0] for case in CASES) == sorted(a for a in TINY_ARCHITECTURES if a != "mixtral")


@pytest.mark.parametrize(("arch", "dtype", "shards", "opset"), CASES, ids=[case[0] for case in CASES])
def test_streamed_torchscript_export_is_the_in_memory_export(tmp_path, monkeypatch, arch, dtype, shards, opset):
    folder = _save(_model(arch), tmp_path / "hf", dtype, shards)
    assert (folder / "model.safetensors.index.json").is_file() == shards
    reference = export_causal_lm(load_causal_lm(folder), tmp_path / "memory" / "m.onnx", exporter="torchscript",
                                 opset=opset, external_data=True, progress=False)
    # Small chunks: the blocked reads and the scattered writes of transposed weights run many times.
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 1000)
    streamed = []
    stream_initializers = streaming._stream_initializers

    def recording(*args):
        streamed.extend(stream_initializers(*args))
        return streamed

    monkeypatch.setattr(streaming, "_stream_initializers", recording)
    result = export_folder_streaming(folder, tmp_path / "streamed" / "m.onnx", exporter="torchscript", opset=opset,
                                     progress=False)
    assert result.architecture == arch
    # The matrices come from the checkpoint, MatMul weights (and tied lm_heads) as transposed views.
    assert any(t.layout.perm is not None for t in streamed) and any(t.layout.perm is None for t in streamed)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["m.onnx", "m.onnx.data"]
    _assert_same_export(result.path, reference)


def test_export_model_streams_with_torchscript_and_checks_it(tmp_path, caplog):
    folder = _save(_model("llama", seed=2), tmp_path / "hf", "bfloat16")
    with caplog.at_level(logging.INFO, logger="qeff.frontend"):
        result = export_model(source=folder, output=tmp_path / "out" / "llama.onnx", exporter="torchscript",
                              progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("streaming llama") for m in messages)
    assert not any("with its weights in memory" in m for m in messages)
    assert result.exporter == "torchscript"
    assert result.inputs == ["input_ids", "attention_mask", "position_ids"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4


def test_the_in_memory_torchscript_export_leaves_the_model_as_it_was(tmp_path):
    # The exporter is given a module around the model's own submodules; it restores that
    # module's mode afterwards, and the model's with it.
    model = build_tiny_model("gpt2")  # dropout: a model left in training mode would not match
    path = export_causal_lm(model, tmp_path / "m.onnx", exporter="torchscript", progress=False)
    assert not any(module.training for module in model.modules())
    assert compare_with_onnxruntime(model, path) <= 1e-4
