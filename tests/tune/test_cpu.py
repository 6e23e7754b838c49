"""qeff tune --backend cpu on the tiny BERT: real onnxruntime measurements, the table, the JSON
(checked against its own raw counts: throughput is calls × batch / seconds, the best row is the
fastest, the Pareto flags are recomputed here) and the PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qeff import cli
from tests.cli.test_cli import invoke

SPACE = {
    "search-mode": "optimized", "objective": "max-throughput", "max-func-eval": 12,
    "search-parameters": {"batch-size": {"min": 1, "max": 4}, "instances": {"min": 1, "max": 2},
                          "threads": {"min": 1, "max": 2}, "opt-level": {"min": 2, "max": 3}},
    "initial-values": [{"batch-size": 1, "instances": 1, "threads": 1, "opt-level": 3}],
}


def test_cpu_backend_on_tiny_bert(tiny_bert_export, tmp_path, monkeypatch, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out_json, png = tmp_path / "tune.json", tmp_path / "tune.png"
    code, out, err = invoke(cli.main, ["tune", tiny_bert_export, "--space", space, "--backend", "cpu",
                                       "--total-cores", 2, "--time", "0.05", "--seq-len", 8, "--json", out_json,
                                       "--plot", png], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert len(rows) == result["evaluations"] <= 12 and result["grid_size"] == 18
    for r in rows:
        c, d = r["config"], r["details"]
        assert c["threads"] * c["instances"] <= 2
        assert d["calls"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["inf_per_s"] == pytest.approx(d["calls"] * c["batch-size"] / d["seconds"])
    fastest = max(rows, key=lambda r: r["inf_per_s"])
    assert result["best"]["config"] == fastest["config"] == rows[0]["config"]
    for r in rows:
        dominated = any(o["inf_per_s"] >= r["inf_per_s"] and o["p99_ms"] <= r["p99_ms"]
                        and (o["inf_per_s"] > r["inf_per_s"] or o["p99_ms"] < r["p99_ms"]) for o in rows)
        assert r["pareto"] is (not dominated)
    best = fastest["config"]
    assert f"intra_op_num_threads = {best['threads']}" in result["best_settings"]
    assert result["best_settings"] in out
    assert "inf/s" in out and "p99 ms" in out and f"measured {len(rows)} of the 18 points" in out
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 500 and np.ptp(image) > 0


def test_a_kv_or_missing_model_and_a_bad_plot_name(tmp_path, monkeypatch, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    code, out, err = invoke(cli.main, ["tune", tmp_path / "none.onnx", "--space", space, "--backend", "cpu",
                                       "--total-cores", 2], monkeypatch, capsys)
    assert code == 2 and "does not exist" in err
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    code, out, err = invoke(cli.main, ["tune", model, "--space", space, "--backend", "cpu", "--plot",
                                       tmp_path / "p.gif"], monkeypatch, capsys)
    assert code == 2 and "unknown image type" in err
    code, out, err = invoke(cli.main, ["tune", model, "--space", space, "--backend", "cpu", "--json", space],
                            monkeypatch, capsys)
    assert code == 2 and "would overwrite" in err
