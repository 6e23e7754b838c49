from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qeff.errors import UnsupportedGraphError, VerificationError
from qeff.optimizer import optimize
from qeff.passes import PASS_REGISTRY, QeffPass, as_ir_model, run_passes
from tests.graphs import mlp_model, save


class _BreakWeightsPass(QeffPass):
    """Scales every float initializer: a wrong rewrite --verify must catch."""

    name = "t_break"
    summary = "test pass"

    def call(self, model):
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32:
                value.const_value = ir.tensor(array * 1.01, name=value.name)
        return ir.passes.PassResult(model, modified=True)


class _RefusingPass(QeffPass):
    name = "t_refuse"
    summary = "test pass"

    def requires(self, model):
        raise UnsupportedGraphError("layer 0: no attention core found", "export with attn=eager")

    def call(self, model):
        raise AssertionError("not reached")


@pytest.fixture(autouse=True, scope="module")
def _unregister():
    yield
    PASS_REGISTRY.pop("t_break", None)
    PASS_REGISTRY.pop("t_refuse", None)


def test_verify_failure_writes_nothing_but_the_report(tmp_path):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    with pytest.raises(VerificationError, match="differs by"):
        optimize(src, "cleanup,t_break", tmp_path / "o.onnx", verify=True, report_path=tmp_path / "r.json")
    assert not (tmp_path / "o.onnx").exists()
    assert not (tmp_path / "o.qeff.json").exists()
    assert (tmp_path / "r.json").exists()


def test_verify_tolerance_is_honoured(tmp_path):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    result = optimize(src, "t_break", tmp_path / "o.onnx", verify=True, tolerance=10.0)
    v = result.report.verification
    assert v.passed and 0 < v.max_abs < 10
    # the generated inputs follow the model's symbolic dims
    assert v.inputs["x"] == [2, 8, 4]


def test_precondition_errors_surface_as_user_errors():
    with pytest.raises(UnsupportedGraphError, match="no attention core"):
        run_passes(as_ir_model(mlp_model()[0]), "t_refuse")


def test_records_time_and_changes_per_pass():
    result = run_passes(as_ir_model(mlp_model()[0]), "cleanup,fold,cleanup")
    names = [r.name for r in result.report.passes]
    assert names == ["cleanup", "fold", "cleanup"]
    assert all(r.seconds >= 0 for r in result.report.passes)
    assert result.report.passes[0].modified and not result.report.passes[2].modified
