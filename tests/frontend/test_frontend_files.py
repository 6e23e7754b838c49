"""What export_causal_lm leaves on disk: atomic writes, external data, error wrapping."""

from __future__ import annotations

import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qeff.errors import ExportError  # noqa: E402
from qeff.frontend import build_tiny_model, compare_with_onnxruntime, export_causal_lm  # noqa: E402


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_failed_export_leaves_nothing(tmp_path, monkeypatch, exporter):
    def boom(*args, **kwargs):
        raise RuntimeError("boom: exporter crashed\nsecond line of details")

    monkeypatch.setattr(torch.onnx, "export", boom)
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(ExportError) as info:
        export_causal_lm(build_tiny_model("llama"), tmp_path / "llama.onnx", exporter=exporter, progress=False)
    assert str(info.value).startswith(f"exporting llama with {exporter} failed: boom: exporter crashed")
    assert "second line" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_failed_export_into_new_folder_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    with pytest.raises(ExportError):
        export_causal_lm(build_tiny_model("gpt2"), tmp_path / "new" / "gpt2.onnx", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_keeps_the_previous_model(tmp_path, monkeypatch):
    import os

    model = build_tiny_model("gpt2")
    target = tmp_path / "gpt2.onnx"
    export_causal_lm(model, target, exporter="torchscript", progress=False)
    before = target.read_bytes()

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(target):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export_causal_lm(model, target, exporter="torchscript", external_data=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.onnx"]
    assert target.read_bytes() == before


def test_unknown_exporter(tmp_path):
    with pytest.raises(ExportError, match="unknown exporter 'jit'"):
        export_causal_lm(build_tiny_model("gpt2"), tmp_path / "m.onnx", exporter="jit", progress=False)
    assert list(tmp_path.iterdir()) == []


def _external_files(path):
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.add({e.key: e.value for e in tensor.external_data}["location"])
    return locations


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_external_data(tmp_path, exporter):
    model = build_tiny_model("gpt2", seed=0)
    path = export_causal_lm(model, tmp_path / "x.onnx", exporter=exporter, external_data=True, progress=False)
    assert path == tmp_path / "x.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.data"]
    assert _external_files(path) == {"x.onnx.data"}  # relative, beside the model
    assert (tmp_path / "x.onnx.data").stat().st_size > 4 * 100_000
    # ORT resolves the data file relative to the model, from any working directory.
    assert compare_with_onnxruntime(model, path) <= 1e-4

    # Re-exporting the same name without external data removes the now stale data file.
    export_causal_lm(model, path, exporter=exporter, external_data=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]
    assert _external_files(path) == set()


def test_error_reports_the_root_cause_without_colours(tmp_path, monkeypatch):
    # The dynamo exporter wraps the actual problem in generic "step 3/3" errors with ANSI colours.
    def wrapped(*args, **kwargs):
        try:
            raise KeyError("No ONNX function found for <OpOverload(op='x.y')>")
        except KeyError as inner:
            raise RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m\nNext steps") from inner

    monkeypatch.setattr(torch.onnx, "export", wrapped)
    with pytest.raises(ExportError) as info:
        export_causal_lm(build_tiny_model("gpt2"), tmp_path / "m.onnx", progress=False)
    message = str(info.value)
    assert "No ONNX function found for <OpOverload(op='x.y')>" in message
    assert "\x1b" not in message and "step 3/3" not in message
    assert list(tmp_path.iterdir()) == []
