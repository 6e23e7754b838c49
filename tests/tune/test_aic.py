"""qeff tune on the card backend, driven through the stand-in compiler and the stand-in runner.

The runner's card is a formula (tests/tune/standin_runner.py); the best point of the space is
found here by evaluating that formula at every feasible point, and the search must return it for
both objectives while measuring fewer points than the grid has. A second search in the same work
folder reuses the compiles and the runs; without the SDK the command fails in one line, and a
dry run prints every command without it."""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import pytest

from qeff import cli
from tests.backend_aic.standin import write_standin
from tests.cli.test_cli import invoke
from tests.graphs import parse, save
from tests.tune.standin_runner import performance, write_runner

TOTAL = 4
SPACE = {
    "search-mode": "optimized", "objective": "max-throughput", "max-func-eval": 100,
    "search-parameters": {"cores": {"min": 1, "max": 4}, "mos": {"min": 1, "max": 3}, "ols": {"min": 2, "max": 4},
                          "batch-size": {"min": 1, "max": 8}, "instances": {"min": 1, "max": 4},
                          "set-size": {"min": 1, "max": 4}},
    "initial-values": [{"cores": 1, "mos": 1, "ols": 2, "batch-size": 1, "instances": 4, "set-size": 1},
                       {"cores": 4, "mos": 1, "ols": 2, "batch-size": 1, "instances": 1, "set-size": 1}],
}


def _grid() -> list[dict[str, int]]:
    """Every point of SPACE that fits on TOTAL cores, enumerated here, not by qeff."""
    points = []
    for c, m, o, b, a, s in itertools.product(range(1, 5), range(1, 4), range(2, 5), (1, 2, 4, 8), range(1, 5),
                                              range(1, 5)):
        if c * a <= TOTAL:
            points.append({"cores": c, "mos": m, "ols": o, "batch-size": b, "instances": a, "set-size": s})
    return points


def _optimum(objective: str) -> dict[str, int]:
    def value(p):
        rate, latency = performance(p["cores"], p["mos"], p["ols"], p["batch-size"], p["instances"], p["set-size"])
        return rate if objective == "max-throughput" else -latency
    return max(_grid(), key=value)


@pytest.fixture
def sdk(tmp_path, monkeypatch) -> Path:
    """The stand-in compiler (recording its flags) and runner, found through the environment."""
    monkeypatch.setenv("QAIC_COMPILER", str(write_standin(tmp_path / "sdk")))
    monkeypatch.setenv("QAIC_RUNNER", str(write_runner(tmp_path / "sdk")))
    monkeypatch.setenv("STANDIN_RECORD_FLAGS", "1")
    monkeypatch.setenv("STANDIN_COUNT", str(tmp_path / "compiles.txt"))
    monkeypatch.setenv("STANDIN_RUNS", str(tmp_path / "runs.txt"))
    return tmp_path


@pytest.fixture
def encoder(tmp_path) -> Path:
    """A model without a KV cache and with a batch and a sequence symbol, like an exported encoder."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    enc (int64[batch_size, sequence_length] input_ids) => (float[batch_size, sequence_length] scores) {
        scores = Cast<to = 1>(input_ids)
    }
    """
    return save(parse(text), tmp_path / "enc.onnx")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _tune(model, space_path, work, objective, monkeypatch, capsys, *extra):
    out_json = work.parent / f"{objective}.json"
    code, out, err = invoke(cli.main, ["tune", model, "--space", space_path, "--objective", objective,
                                       "--total-cores", TOTAL, "--workdir", work, "--time", "0.5",
                                       "--define-symbol", "sequence_length=16", "--parallel-compiles", 3,
                                       "--json", out_json, *extra], monkeypatch, capsys)
    assert code == 0, err
    return out, json.loads(out_json.read_text())


def test_the_search_finds_the_best_point_for_both_objectives(sdk, encoder, tmp_path, monkeypatch, capsys):
    space_path = tmp_path / "space.json"
    space_path.write_text(json.dumps(SPACE))
    work = tmp_path / "work"
    grid = len(_grid())
    measured = {}
    for objective in ("max-throughput", "min-latency"):
        runs_before, compiles_before = len(_lines(sdk / "runs.txt")), len(_lines(sdk / "compiles.txt"))
        out, result = _tune(encoder, space_path, work, objective, monkeypatch, capsys)
        best = _optimum(objective)
        assert result["best"]["config"] == best, objective
        assert result["grid_size"] == grid
        assert result["evaluations"] < grid
        measured[objective] = result["evaluations"]
        print(f"{objective}: {result['evaluations']} points measured of a {grid}-point grid "
              f"({result['reused']} reused); best {best}")
        # Each start stays within max-func-eval.
        assert all(s["evaluations"] <= SPACE["max-func-eval"] for s in result["starts"])
        # Every measured point fits on the cores available.
        assert all(r["config"]["cores"] * r["config"]["instances"] <= TOTAL for r in result["rows"])
        # The runner ran once per point not measured before, the compiler once per new QPC.
        runs = _lines(sdk / "runs.txt")[runs_before:]
        assert len(runs) == result["evaluations"] - result["reused"]
        compiled = _lines(sdk / "compiles.txt")[compiles_before:]
        qpcs = {(r["config"]["cores"], r["config"]["mos"], r["config"]["ols"], r["config"]["batch-size"])
                for r in result["rows"]}
        assert len(compiled) <= len(qpcs) and len(set(compiled)) == len(compiled)
        # The inferences/s parsed from the runner are the formula's, rounded as the runner prints them.
        for r in result["rows"][:5]:
            c = r["config"]
            rate, latency = performance(c["cores"], c["mos"], c["ols"], c["batch-size"], c["instances"], c["set-size"])
            assert r["inf_per_s"] == pytest.approx(rate, abs=5e-4)
            assert r["p50_ms"] == pytest.approx(latency / 1000, abs=1e-6)
        # The best point as the qeff compile and qaic-runner commands that reproduce it.
        b = result["best"]["config"]
        assert (f"qeff compile {encoder} -o qpc-best --num-cores {b['cores']} --batch-size {b['batch-size']} "
                f"--mos {b['mos']} --ols {b['ols']} --define-symbol sequence_length=16 --multicast-weights "
                f"--stats-batchsize {b['batch-size']}") in out
        assert f"qaic-runner -t qpc-best/qpc -a {b['instances']} -S {b['set-size']} -d 0" in out
        assert f"measured {result['evaluations']} of the {grid} points" in out
    # The second search found points of the first in the work folder and did not run them again.
    assert result["reused"] > 0
    print(f"evaluations: {measured}, grid: {grid}")


def test_the_compile_and_run_commands(sdk, encoder, tmp_path, monkeypatch, capsys):
    """The compile goes through qeff compile's backend (its command.txt), the runner gets the
    configurator's flags; the QPC got what the point asked for."""
    space = {"objective": "min-latency", "search-mode": "exhaustive",
             "search-parameters": {"cores": {"min": 2, "max": 2}, "batch-size": {"min": 4, "max": 4}},
             "static-parameters": {"instances": 2, "set-size": 3, "ols": 2}}
    space_path = tmp_path / "space.json"
    space_path.write_text(json.dumps(space))
    work = tmp_path / "work"
    _tune(encoder, space_path, work, "min-latency", monkeypatch, capsys, "--no-multicast-weights")
    folder = work / "compiles" / "qpc-cores-2-mos-default-ols-2-bs-4"
    command = shlex.split((folder / "command.txt").read_text())
    assert command[0] == str(sdk / "sdk" / "qaic-compile")
    assert set(command[1:]) == {"-aic-hw", "-aic-hw-version=ai100", f"-m={encoder.resolve()}", "-convert-to-fp16",
                                "-aic-num-cores=2", "-onnx-define-symbol=batch_size,4",
                                "-onnx-define-symbol=sequence_length,16", "-stats-batchsize=4", "-ols=2",
                                f"-aic-binary-dir={folder.resolve() / 'qpc'}"}
    (run,) = _lines(sdk / "runs.txt")
    out_dir = work / "runs" / "qpc-cores-2-mos-default-ols-2-bs-4-inst-2-set-3"
    assert shlex.split(run) == ["-t", str(folder.resolve() / "qpc"), "-a", "2", "-S", "3", "-d", "0", "--time", "0.5",
                                "--aic-profiling-type", "latency", "--aic-profiling-out-dir", str(out_dir.resolve()),
                                "--aic-profiling-start-iter", "10", "--aic-profiling-num-samples", "99999"]
    assert sorted(p.name for p in out_dir.glob("aic-profiling-*")) == [
        "aic-profiling-program-0-latency.txt", "aic-profiling-program-1-latency.txt"]


def test_without_the_sdk_one_line_and_a_dry_run_prints_the_plan(encoder, tmp_path, monkeypatch, capsys):
    for name in ("QAIC_COMPILER", "QAIC_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if Path("/opt/qti-aic/exec/qaic-runner").exists():
        pytest.skip("an SDK is installed here")
    space_path = tmp_path / "space.json"
    space_path.write_text(json.dumps(SPACE))
    args = ["tune", encoder, "--space", space_path, "--total-cores", TOTAL, "--workdir", tmp_path / "work",
            "--define-symbol", "sequence_length=16"]
    code, out, err = invoke(cli.main, args, monkeypatch, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no Cloud AI compiler found" in err
    assert not (tmp_path / "work").exists()

    code, out, err = invoke(cli.main, [*args, "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    compiles = [shlex.split(line) for line in lines if "qaic-compile" in line]
    runs = [shlex.split(line) for line in lines if "qaic-runner" in line]
    assert len(compiles) == len(runs) == 2  # the two starting points, one QPC each
    for start, compile_args, run_args in zip(SPACE["initial-values"], compiles, runs):
        assert compile_args[0] == "/opt/qti-aic/exec/qaic-compile"
        assert f"-aic-num-cores={start['cores']}" in compile_args and f"-mos={start['mos']}" in compile_args
        assert f"-ols={start['ols']}" in compile_args and "-multicast-weights" in compile_args
        assert f"-onnx-define-symbol=batch_size,{start['batch-size']}" in compile_args
        assert run_args[0] == "/opt/qti-aic/exec/qaic-runner"
        assert run_args[run_args.index("-a") + 1] == str(start["instances"])
        assert run_args[run_args.index("-S") + 1] == str(start["set-size"])

    code, out, err = invoke(cli.main, [*args, "--dry-run", "--grid"], monkeypatch, capsys)
    assert code == 0, err
    runs = [line for line in out.splitlines() if "qaic-runner" in line]
    compiles = {line for line in out.splitlines() if "qaic-compile" in line}
    assert len(runs) == len(_grid())
    assert len(compiles) == len({(p["cores"], p["mos"], p["ols"], p["batch-size"]) for p in _grid()})


def test_a_symbol_without_a_value_is_refused_before_any_compile(sdk, encoder, tmp_path, monkeypatch, capsys):
    space_path = tmp_path / "space.json"
    space_path.write_text(json.dumps(SPACE))
    code, out, err = invoke(cli.main, ["tune", encoder, "--space", space_path, "--total-cores", TOTAL,
                                       "--workdir", tmp_path / "work"], monkeypatch, capsys)
    assert code == 2 and "no value for the model's symbol sequence_length" in err
    assert _lines(sdk / "compiles.txt") == [] and not (tmp_path / "work").exists()
