"""bench/bench_io.py: the generator makes a runnable model and the script reports its numbers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_io.py"


def _load_bench_io():
    spec = importlib.util.spec_from_file_location("bench_io", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_io"] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_io():
    return _load_bench_io()


def test_generated_model_runs_in_onnxruntime(bench_io, tmp_path):
    gen = bench_io.generate_model(tmp_path, 0.02, seed=0)
    assert gen.path.name == "model.onnx" and gen.data_path.name == "model.onnx.data"
    assert gen.data_path.stat().st_size == gen.nbytes
    assert 0.5 * 0.02 * (1 << 30) < gen.nbytes < 1.5 * 0.02 * (1 << 30)

    proto = onnx.load(str(gen.path), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}  # relative, beside the model

    logits = bench_io.run_in_onnxruntime(gen.path, batch=2, seq=3)
    assert logits.shape == (2, 3, gen.config.vocab)
    assert np.isfinite(logits).all()


def test_choose_config_scales_with_size(bench_io):
    small = bench_io.choose_config(0.05)
    big = bench_io.choose_config(3)
    assert (big.hidden, big.intermediate, big.vocab) == (2048, 5632, 32000)
    assert abs(big.nbytes / (3 << 30) - 1) < 0.1
    assert small.nbytes < 0.1 * (1 << 30) and small.layers >= 1


def test_script_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size-gb", "0.02", "--repeat", "1", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for key in ("model_gb", "copy_s", "qeff_opt_s", "ratio", "peak_rss_gb"):
        assert isinstance(results[key], float) and results[key] > 0, key
    assert set(results["targets"]) >= {"ratio_pass", "peak_rss_pass"}
    assert results["output_check"]["nodes_out"] == results["output_check"]["nodes_in"] - 1
    assert "ratio qeff-opt / copy" in proc.stdout
