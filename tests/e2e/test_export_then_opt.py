"""Exported tiny models through cleanup,fold: same numbers in onnxruntime, manifest written."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from qeff.optimizer import optimize
from qeff.passes.ir.sample_inputs import sample_inputs
from tests.graphs import run

pytest.importorskip("torch")


def _op_count(path, op):
    return sum(1 for n in ir.load(path).graph if n.op_type == op)


@pytest.mark.parametrize(
    "arch,exporter",
    [("llama", "dynamo"), ("llama", "torchscript"), ("gpt2", "torchscript"), ("mixtral", "dynamo")],
)
def test_cleanup_fold_keep_outputs_identical(arch, exporter, tiny_export, tmp_path):
    src = tiny_export(arch, exporter=exporter)
    out = tmp_path / "opt.onnx"
    result = optimize(src, "cleanup,fold", out, report_path=tmp_path / "r.json")

    # Inputs at a shape other than the export's, right-padded, so folded shapes are exercised.
    feeds = sample_inputs(ir.load(src), seed=7, dims={"batch": 3, "seq": 11})
    before = run(src, feeds)["logits"]
    after = run(out, feeds)["logits"]
    assert after.shape == before.shape == (3, 11, 512)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)

    manifest = json.loads(out.with_name("opt.qeff.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["cleanup", "fold"]
    assert [i["name"] for i in manifest["outputs"]] == ["logits"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][1]["nodes_after"] <= report["passes"][0]["nodes_after"]
    assert result.report.passes[0].nodes_before >= result.report.passes[1].nodes_after


def test_fold_removes_legacy_shape_arithmetic(tiny_export, tmp_path):
    # The TorchScript exporter derives every reshape target from Shape(x) at run time; the
    # head count and head size are static, so the arithmetic reading them folds away. The
    # Concats that also take batch or seq stay: those dims are symbolic.
    src = tiny_export("llama", exporter="torchscript")
    out = tmp_path / "opt.onnx"
    result = optimize(src, "cleanup,fold", out)
    for op in ("Shape", "Gather", "Unsqueeze"):
        assert _op_count(out, op) < _op_count(src, op), op
    assert result.report.passes[1].details["folded"]["Gather"] >= 8
    assert len(ir.load(out).graph) < 0.9 * len(ir.load(src).graph)


def test_verify_on_exported_model(tiny_export, tmp_path):
    src = tiny_export("llama")
    result = optimize(src, "cleanup,fold", tmp_path / "v.onnx", verify=True)
    assert result.report.verification.passed
    assert result.report.verification.max_abs <= 1e-5
