"""export_model, the one-call entry point, and importing qeff.frontend without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qeff.errors import ExportError


def test_import_without_torch():
    # A meta-path hook makes torch and transformers unimportable in a fresh interpreter.
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import qeff.frontend as frontend
from qeff.errors import MissingDependencyError
assert "llama" in frontend.TINY_ARCHITECTURES
try:
    frontend.export_model(tiny="llama", output="never.onnx")
except MissingDependencyError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exporting needs torch and transformers" in done.stdout
    assert "pip install 'qeff-opt[export]'" in done.stdout


@pytest.mark.parametrize("kwargs", [{}, {"source": "x", "tiny": "llama"}])
def test_exactly_one_source(kwargs, tmp_path):
    from qeff.frontend import export_model

    with pytest.raises(ExportError, match="exactly one"):
        export_model(output=tmp_path / "m.onnx", **kwargs)


def test_export_model_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qeff.frontend import ExportResult, export_model

    result = export_model(tiny="mpt", output=tmp_path / "mpt.onnx", exporter="torchscript", opset=18, progress=False)
    assert isinstance(result, ExportResult)
    assert result.path == tmp_path / "mpt.onnx" and result.path.is_file()
    assert result.architecture == "mpt"
    assert result.exporter == "torchscript"
    assert result.opset == 18
    assert result.inputs == ["input_ids", "attention_mask"]
    assert result.num_parameters > 100_000
    assert result.seconds > 0
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4

    unchecked = export_model(tiny="gpt2", output=tmp_path / "gpt2.onnx", exporter="torchscript", check=False, progress=False)
    assert unchecked.max_abs_diff is None
    assert unchecked.inputs == ["input_ids", "attention_mask", "position_ids"]
    assert unchecked.opset == 20
