from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qeff.errors import ModelLoadError, OutputPathError, QeffError
from qeff.optimizer import optimize
from qeff.passes import as_ir_model, load_model, save_model
from qeff.passes.ir import model_io
from tests.graphs import TWO_MATMULS, data_file, mlp_expected, mlp_model, parse, run, save, set_external_location

TEXT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 64] x) => (float[2, 64] y) {
    y = MatMul(x, w)
}
"""


def _external_model(tmp_path, name="ext.onnx"):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    path = save_model(as_ir_model(parse(TEXT, {"w": w})), tmp_path / name, external_data=True)
    return path, w


def _digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_external_data_round_trip_is_lazy_relative_and_leaves_input_alone(tmp_path):
    src, w = _external_model(tmp_path)
    data = data_file(src)
    assert re.fullmatch(r"ext\.onnx\.[0-9a-f]{8}\.data", data.name)
    before = _digest(src, data)
    model = load_model(src)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and tensor.location == data.name

    (tmp_path / "out").mkdir()
    result = optimize(src, "cleanup", tmp_path / "out" / "o.onnx")
    assert _digest(src, data) == before
    proto = onnx.load(str(result.output), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(locations) == 1 and re.fullmatch(r"o\.onnx\.[0-9a-f]{8}\.data", locations.pop())
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run(result.output, {"x": x})["y"], x @ w, rtol=1e-5)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp left


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model|empty ONNX model"):
        load_model(bad)


def test_truncated(tmp_path):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    blob = src.read_bytes()
    src.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError):
        load_model(src)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)


def test_missing_external_data(tmp_path):
    src, _ = _external_model(tmp_path)
    data_file(src).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(src)


def test_truncated_external_data(tmp_path):
    src, _ = _external_model(tmp_path)
    data = data_file(src)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="does not hold"):
        load_model(src)


@pytest.mark.parametrize("location,fragment", [("../outside.data", "outside the model's folder"),
                                               ("/etc/passwd", "absolute path")])
def test_unsafe_external_locations(tmp_path, location, fragment):
    src, _ = _external_model(tmp_path)
    set_external_location(src, location)
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(src)


def test_output_may_not_overwrite_inputs(tmp_path):
    src, _ = _external_model(tmp_path)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        optimize(src, "cleanup", src)
    # ext.onnx.data is the input's data file; an output named ext.onnx would write it.
    with pytest.raises(OutputPathError, match="overwrite the input"):
        optimize(src, "cleanup", tmp_path / "." / "ext.onnx")
    with pytest.raises(OutputPathError, match="does not exist"):
        optimize(src, "cleanup", tmp_path / "no" / "o.onnx")
    with pytest.raises(OutputPathError, match="end in .onnx"):
        optimize(src, "cleanup", tmp_path / "o.txt")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()

    def broken_save(model, path, **kwargs):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        optimize(src, "cleanup", tmp_path / "out" / "o.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    first = optimize(src, "cleanup", tmp_path / "o.onnx")
    previous = first.output.read_bytes()

    def broken_save(model, path, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", broken_save)
    with pytest.raises(OSError):
        optimize(src, "cleanup,fold", tmp_path / "o.onnx")
    assert first.output.read_bytes() == previous


def test_accepts_modelproto_ir_model_and_graphsurgeon(tmp_path):
    gs = pytest.importorskip("onnx_graphsurgeon")
    proto, weights = mlp_model()
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    expected = mlp_expected(x, weights["w"])

    as_ir = as_ir_model(proto)
    nodes_before = len(as_ir.graph)
    for i, given in enumerate([proto, as_ir, gs.import_onnx(proto)]):
        result = optimize(given, "cleanup,fold", tmp_path / f"o{i}.onnx")
        np.testing.assert_allclose(run(result.output, {"x": x})["y"], expected, rtol=1e-6)
    assert len(as_ir.graph) == nodes_before  # an ir.Model given in is not modified
    with pytest.raises(TypeError, match="expected a path"):
        as_ir_model(42)


def test_in_memory_input_can_be_verified(tmp_path):
    proto, _ = mlp_model()
    result = optimize(proto, "cleanup,fold", verify=True)
    assert result.output is None
    assert result.report.verification.passed
    assert result.report.verification.max_abs == 0.0


def test_manifest_and_report_beside_output(tmp_path):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    result = optimize(src, "cleanup,fold", tmp_path / "m.opt.onnx", report_path=tmp_path / "r.json")
    manifest = json.loads((tmp_path / "m.opt.qeff.json").read_text())
    assert manifest["format"] == "qeff-manifest/1"
    assert manifest["model"] == "m.opt.onnx"
    assert manifest["source"] == str(src)
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "fold"]
    assert manifest["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", "seq", 4]}]
    report = json.loads((tmp_path / "r.json").read_text())
    cleanup, fold = report["passes"]
    assert cleanup["name"] == "cleanup" and cleanup["nodes_before"] == 18
    assert cleanup["ops_delta"]["Identity"] == -1
    assert cleanup["inputs_removed"] == ["unused"]
    assert cleanup["initializers_before"] == 3 and cleanup["initializers_after"] == 1
    assert fold["details"]["folded"]["Concat"] == 1
    assert fold["nodes_after"] < fold["nodes_before"]
    assert report["output"] == str(result.output)


def test_external_save_mixes_copied_and_rewritten_weights(tmp_path):
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 64)).astype(np.float32)
    src = save_model(as_ir_model(parse(TWO_MATMULS, {"w1": w1, "w2": w2})), tmp_path / "m.onnx", external_data=True)
    model = load_model(src)
    # w1 stays in the input's data file (copied by range), w2 is rewritten in memory.
    model.graph.initializers["w2"].const_value = ir.tensor(2 * w2, name="w2")
    out = save_model(model, tmp_path / "o.onnx", external_data=True)
    assert data_file(out).stat().st_size == w1.nbytes + w2.nbytes
    # the in-memory model still reads from the input file afterwards
    assert model.graph.initializers["w1"].const_value.path == str(data_file(src))
    reloaded = load_model(out)
    np.testing.assert_array_equal(reloaded.graph.initializers["w1"].const_value.numpy(), w1)
    np.testing.assert_array_equal(reloaded.graph.initializers["w2"].const_value.numpy(), 2 * w2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], x @ w1 @ (2 * w2), rtol=1e-4, atol=1e-4)


def _referenced(model_path):
    proto = onnx.load(str(model_path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_link_data_shares_the_input_file_instead_of_copying(tmp_path):
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 64)).astype(np.float32)
    src = save_model(as_ir_model(parse(TWO_MATMULS, {"w1": w1, "w2": w2})), tmp_path / "m.onnx", external_data=True)
    source_data = data_file(src)
    before = _digest(src, source_data)
    out = optimize(src, "cleanup", tmp_path / "o.onnx", link_data=True).output
    (linked,) = _referenced(out)
    assert os.stat(tmp_path / linked).st_ino == os.stat(source_data).st_ino  # one file, two names
    assert _digest(src, source_data) == before
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], x @ w1 @ w2, rtol=1e-4, atol=1e-4)
    # Deleting the input keeps the output whole: the link is a name of its own.
    src.unlink()
    source_data.unlink()
    np.testing.assert_allclose(run(out, {"x": x})["y"], x @ w1 @ w2, rtol=1e-4, atol=1e-4)


def test_link_data_writes_rewritten_weights_to_a_new_file(tmp_path):
    rng = np.random.default_rng(10)
    w1 = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 64)).astype(np.float32)
    src = save_model(as_ir_model(parse(TWO_MATMULS, {"w1": w1, "w2": w2})), tmp_path / "m.onnx", external_data=True)
    copied = optimize(src, "mxfp6:skip=w1", tmp_path / "c.onnx").output
    linked = optimize(src, "mxfp6:skip=w1", tmp_path / "l.onnx", link_data=True).output
    files = _referenced(linked)
    assert len(files) == 2  # the link (w1, unchanged) and the new file (w2, quantized)
    inodes = {os.stat(tmp_path / f).st_ino for f in files}
    assert os.stat(data_file(src)).st_ino in inodes
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(linked, {"x": x})["y"], run(copied, {"x": x})["y"])


def test_link_data_copies_where_no_link_can_be_made(tmp_path, monkeypatch):
    src, w = _external_model(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(model_io.os, "link", refuse)
    out = optimize(src, "cleanup", tmp_path / "o.onnx", link_data=True).output
    assert os.stat(data_file(out)).st_ino != os.stat(data_file(src)).st_ino
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"], x @ w, rtol=1e-5)


def test_link_data_without_external_data_is_refused(tmp_path):
    src, _ = _external_model(tmp_path)
    with pytest.raises(QeffError, match="--link-data"):
        optimize(src, "cleanup", tmp_path / "o.onnx", link_data=True, external_data=False)
    assert not (tmp_path / "o.onnx").exists()
