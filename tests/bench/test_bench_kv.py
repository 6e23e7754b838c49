"""bench/bench_kv.py: a 2-layer run times the kv pass, checks generation and reports its numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_kv.py"


def _load_bench_kv():
    spec = importlib.util.spec_from_file_location("bench_kv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kv"] = module
    spec.loader.exec_module(module)
    return module


def test_two_layer_run_reports_and_passes(tmp_path, capsys):
    bench_kv = _load_bench_kv()
    out = tmp_path / "out.json"
    code = bench_kv.main(["--layers", "2", "--repeat", "1", "--ctx-len", "32", "--json", str(out),
                          "--workdir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err

    for label in ("kv pass alone", "optimize kv (load+pass+save)", "load+save, no pass",
                  "ratio optimize / load+save", "nodes before -> after", "generation check"):
        assert label in captured.out, label

    results = json.loads(out.read_text())
    assert results["layers"] == 2 and results["ctx_len"] == 32
    for key in ("pass_s", "optimize_s", "load_save_s", "ratio"):
        assert isinstance(results[key], float) and results[key] > 0, key
    # Each layer gains cache writes and a new attention core.
    assert results["nodes_after"] > results["nodes_before"] > 0
    agreed, expected = results["verification"]["token_agreement"].split("/")
    assert agreed == expected and int(expected) > 0
    assert results["verification"]["passed"]
    assert (tmp_path / "work" / "kv" / "model.onnx").exists()  # --workdir is kept


def test_rejects_bad_arguments(capsys):
    bench_kv = _load_bench_kv()
    for argv in (["--layers", "0"], ["--repeat", "0"], ["--ctx-len", "1"]):
        with pytest.raises(SystemExit) as exc:
            bench_kv.parse_args(argv)
        assert exc.value.code == 2
    capsys.readouterr()
