"""onnxruntime sessions use the mapped weights in place unless asked to pack them.

The memory claim is measured, not assumed: in a child process, a 128 MB MatMul weight costs
about its size in private (anonymous) memory with prepacking and almost nothing without, since
onnxruntime maps the external-data file and the MatMul then reads the mapped pages.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qeff.common.onnxrt import onnxruntime_session
from qeff.passes import as_ir_model, save_model
from tests.graphs import parse

WEIGHT_MB = 128

_CHILD = """
import json, sys
import numpy as np
from qeff.common.onnxrt import onnxruntime_session
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
before = anon_mb()
session = onnxruntime_session(sys.argv[1], prepack=sys.argv[2] == "1")
out = session.run(None, {"x": np.ones((1, 1024), np.float32)})[0]
print(json.dumps({"anon_mb": anon_mb() - before, "sum": float(out.sum())}))
"""


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory):
    w = np.random.default_rng(0).standard_normal((1024, WEIGHT_MB * 256)).astype(np.float32)
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[M, 1024] x) => (float[M, {w.shape[1]}] y) {{ y = MatMul(x, w) }}
    """
    path = save_model(as_ir_model(parse(text, {"w": w})), tmp_path_factory.mktemp("m") / "m.onnx",
                      external_data=True)
    return path, float(w.sum(axis=0, dtype=np.float64).sum())


def _child(path, prepack):
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), "1" if prepack else "0"],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_prepacking_off_keeps_the_weights_in_the_mapped_file(matmul_model):
    path, expected = matmul_model
    packed, mapped = _child(path, True), _child(path, False)
    for result in (packed, mapped):
        assert result["sum"] == pytest.approx(expected, rel=1e-4)
    assert packed["anon_mb"] > 0.8 * WEIGHT_MB, packed
    assert mapped["anon_mb"] < 0.25 * WEIGHT_MB, mapped


def _prepacking_disabled(session) -> bool:
    options = session.get_session_options()
    try:
        return options.get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return False


def test_ort_session_does_not_prepack_unless_asked(matmul_model):
    from qeff.runtime.ort import OrtSession

    path, _ = matmul_model
    assert _prepacking_disabled(OrtSession(path, providers=["CPUExecutionProvider"])._session)
    assert not _prepacking_disabled(OrtSession(path, providers=["CPUExecutionProvider"], prepack=True)._session)
    assert not _prepacking_disabled(onnxruntime_session(path))

