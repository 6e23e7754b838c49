"""backend_aic: the compile files and command pinned as literal text for a kv model, a
continuous-batching model, an mxfp6 + MXINT8-KV model and a 4-device compile; the real subprocess
path driven by a stand-in compiler (success, failure with the log tail, timeout, cache hit, the
older qaic-exec flavour, an SDK that rejects named specializations); and the clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qeff import cli
from qeff.backend_aic import CompileOptions, compile_model
from qeff.backend_aic import compiler as compiler_mod
from qeff.errors import QeffError
from qeff.optimizer import optimize
from tests.backend_aic.standin import write_standin
from tests.cli.test_cli import invoke


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory) -> dict[str, Path]:
    """Tiny llama (2 layers) rewritten four ways; each with its manifest beside it."""
    folder = tmp_path_factory.mktemp("compile-models")
    plain = tiny_export("llama")
    pipelines = {
        "kv": "kv:ctx_len=128,prefill_len=32",
        "cb": "kv:ctx_len=128,continuous_batching=true,full_batch_size=4",
        "mx": "kv:ctx_len=128,mxfp6,mxint8kv",
        "bound": "kv:ctx_len=64,fixed:ctx_len=64",
    }
    return {name: optimize(plain, passes, output=folder / f"{name}.onnx").output for name, passes in pipelines.items()}


def _dry(model: Path, folder: Path, **options) -> tuple[str, dict[str, str]]:
    result = compile_model(model, folder, CompileOptions(dry_run=True, **options))
    text = result.command_text.replace(str(folder.resolve()), "<dir>").replace(str(model.resolve()), "<model>")
    files = {name: (folder / name).read_text() for name in result.files.values()}
    assert (folder / "command.txt").read_text().strip() == result.command_text
    return text, files


_KV_IO = "".join(f" - IOName: past_{kind}.{layer}{suffix}\n   Precision: {{p}}\n\n"
                 for layer in range(2) for kind in ("key", "value") for suffix in ("", "_RetainedState"))


def test_kv_model(models, tmp_path):
    command, files = _dry(models["kv"], tmp_path / "kv")
    assert command == (
        "/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=<model> -retained-state "
        "-convert-to-fp16 -aic-num-cores=16 -network-specialization-config=<dir>/specializations.json "
        "-custom-IO-list-file=<dir>/custom_io.yaml -aic-binary-dir=<dir>/qpc")
    assert json.loads(files["specializations.json"]) == {"specializations": [
        {"batch_size": "1", "seq_len": "32", "ctx_len": "128"},
        {"batch_size": "1", "seq_len": "1", "ctx_len": "128"}]}
    assert files["specializations.json"] == (
        '{\n  "specializations": [\n    {\n      "batch_size": "1",\n      "seq_len": "32",\n      "ctx_len": "128"\n'
        '    },\n    {\n      "batch_size": "1",\n      "seq_len": "1",\n      "ctx_len": "128"\n    }\n  ]\n}\n')
    assert files["custom_io.yaml"] == _KV_IO.format(p="float16")
    assert files["custom_io.yaml"].startswith(" - IOName: past_key.0\n   Precision: float16\n\n"
                                              " - IOName: past_key.0_RetainedState\n")
    _, named = _dry(models["kv"], tmp_path / "named", specializations_format="named")
    assert named["specializations.json"] == """{
  "specializations": [
    {
      "name": "Prefill",
      "symbols": {
        "batch_size": "1",
        "seq_len": "32",
        "ctx_len": "128"
      }
    },
    {
      "name": "Decode",
      "symbols": {
        "batch_size": "1",
        "seq_len": "1",
        "ctx_len": "128"
      }
    }
  ]
}
"""


def test_continuous_batching_model(models, tmp_path):
    command, files = _dry(models["cb"], tmp_path / "cb", prefill_len=16, num_cores=14, mos=1, depth_first=True)
    assert command == (
        "/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=<model> -retained-state "
        "-convert-to-fp16 -aic-num-cores=14 -mos=1 -aic-enable-depth-first "
        "-network-specialization-config=<dir>/specializations.json "
        "-custom-IO-list-file=<dir>/custom_io.yaml -aic-binary-dir=<dir>/qpc")
    assert files["specializations.json"] == """{
  "specializations": [
    {
      "batch_size": "1",
      "seq_len": "16",
      "ctx_len": "128",
      "full_batch_size": "4"
    },
    {
      "batch_size": "4",
      "seq_len": "1",
      "ctx_len": "128",
      "full_batch_size": "4"
    }
  ]
}
"""
    assert files["custom_io.yaml"] == _KV_IO.format(p="float16")


def test_mxfp6_and_mxint8_kv_model(models, tmp_path):
    """The manifest turns on -mxfp6-matmul and MXINT8 custom IO; both can be overridden."""
    command, files = _dry(models["mx"], tmp_path / "mx", ols=2, extra_flags=("-aic-perf-metrics",))
    assert command == (
        "/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=<model> -retained-state "
        "-convert-to-fp16 -mxfp6-matmul -aic-num-cores=16 -ols=2 -aic-perf-metrics "
        "-network-specialization-config=<dir>/specializations.json "
        "-custom-IO-list-file=<dir>/custom_io.yaml -aic-binary-dir=<dir>/qpc")
    assert files["custom_io.yaml"] == _KV_IO.format(p="mxint8")
    command, files = _dry(models["mx"], tmp_path / "mx2", mxfp6=False, kv_precision="bfloat16")
    assert "-mxfp6-matmul" not in command and files["custom_io.yaml"] == _KV_IO.format(p="bfloat16")


def test_four_device_compile(models, tmp_path):
    command, files = _dry(models["kv"], tmp_path / "mdp", devices=(0, 1, 2, 3), num_cores=16)
    assert command == (
        "/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=<model> -retained-state "
        "-convert-to-fp16 -aic-num-cores=16 -mdp-load-partition-config=<dir>/mdp_ts_4.json "
        "-network-specialization-config=<dir>/specializations.json "
        "-custom-IO-list-file=<dir>/custom_io.yaml -aic-binary-dir=<dir>/qpc")
    devices = ",\n".join(f'        {{\n          "deviceId": {d},\n          "numCores": 16\n        }}' for d in range(4))
    assert files["mdp_ts_4.json"] == (
        '{\n  "connections": [\n    {\n      "devices": [\n        0,\n        1,\n        2,\n        3\n'
        '      ],\n      "type": "p2p"\n    }\n  ],\n  "partitions": [\n    {\n      "name": "Partition0",\n'
        f'      "devices": [\n{devices}\n      ]\n    }}\n  ]\n}}\n')
    assert json.loads(files["mdp_ts_4.json"]) == {
        "connections": [{"devices": [0, 1, 2, 3], "type": "p2p"}],
        "partitions": [{"name": "Partition0", "devices": [{"deviceId": d, "numCores": 16} for d in range(4)]}]}


def test_specializations_hold_only_the_models_symbols(models, tmp_path):
    """fixed:ctx_len=64 bound the cache length: ctx_len leaves the specializations."""
    _, files = _dry(models["bound"], tmp_path / "b", prefill_len=8)
    assert json.loads(files["specializations.json"])["specializations"] == [
        {"batch_size": "1", "seq_len": "8"}, {"batch_size": "1", "seq_len": "1"}]


# -- the real subprocess path, with the stand-in compiler --------------------------------------

@pytest.fixture
def standin(tmp_path, monkeypatch) -> Path:
    path = write_standin(tmp_path / "sdk")
    monkeypatch.setenv("QAIC_COMPILER", str(path))
    monkeypatch.setenv("STANDIN_COUNT", str(tmp_path / "runs.txt"))
    return path


def _runs(tmp_path: Path) -> int:
    runs = tmp_path / "runs.txt"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_compile_then_cache_hit_then_recompile(models, tmp_path, standin):
    folder = tmp_path / "out"
    result = compile_model(models["kv"], folder)
    assert result.status == "compiled" and (folder / "qpc" / "programqpc.bin").read_bytes() == b"stand-in qpc compile"
    assert "Compilation complete" in (folder / "compile.log").read_text()
    params = json.loads((folder / "qeff-compile.json").read_text())
    assert params["hash"] == result.hash and params["status"] == "compiled" and params["command"] == result.command
    assert compile_model(models["kv"], folder).status == "cached" and _runs(tmp_path) == 1
    assert compile_model(models["kv"], folder, CompileOptions(num_cores=8)).status == "compiled"
    assert _runs(tmp_path) == 2
    (folder / "qpc" / "programqpc.bin").unlink()  # a qpc/ without its marker: a failed compile
    assert compile_model(models["kv"], folder, CompileOptions(num_cores=8)).status == "compiled"
    assert _runs(tmp_path) == 3


def test_qaic_exec_flavour(models, tmp_path, monkeypatch):
    exe = write_standin(tmp_path / "old-sdk", "qaic-exec")
    result = compile_model(models["mx"], tmp_path / "out", CompileOptions(compiler=str(exe)))
    assert result.command[:5] == [str(exe), "-aic-hw", "-aic-hw-version=2.0", f"-m={models['mx'].resolve()}",
                                  "-compile-only"]
    assert (tmp_path / "out" / "qpc" / "programqpc.bin").read_bytes() == b"stand-in qpc exec"


def test_compiler_failure_shows_exit_code_and_log_tail(models, tmp_path, standin, monkeypatch, capsys):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(QeffError) as error:
        compile_model(models["kv"], tmp_path / "out")
    text = str(error.value)
    assert "exit code 3" in text and "out of memory on core 3" in text and "compiling node 29" in text
    assert "compiling node 5" not in text  # only the tail
    code, _, err = invoke(cli.main, ["compile", models["kv"], "-o", tmp_path / "cli"], monkeypatch, capsys)
    assert code == 2 and "exit code 3" in err and "out of memory on core 3" in err and "Traceback" not in err


def test_timeout_stops_the_compiler(models, tmp_path, standin, monkeypatch):
    monkeypatch.setenv("STANDIN_SLEEP", "30")
    with pytest.raises(QeffError, match="did not finish within 1 s"):
        compile_model(models["kv"], tmp_path / "out", CompileOptions(timeout=1))


def test_older_sdk_rejects_named_specializations(models, tmp_path, standin, monkeypatch):
    monkeypatch.setenv("STANDIN_OLD_SDK", "1")
    with pytest.raises(QeffError, match="type must be string, but is object"):
        compile_model(models["kv"], tmp_path / "named", CompileOptions(specializations_format="named"))
    assert compile_model(models["kv"], tmp_path / "flat").status == "compiled"


def test_no_compiler_names_every_path_and_suggests_dry_run(models, tmp_path, monkeypatch):
    monkeypatch.delenv("QAIC_COMPILER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(compiler_mod, "DEFAULT_PATHS", (str(tmp_path / "a/qaic-compile"), str(tmp_path / "b/qaic-exec")))
    with pytest.raises(QeffError) as error:
        compile_model(models["kv"], tmp_path / "out")
    assert "a/qaic-compile" in str(error.value) and "b/qaic-exec" in str(error.value)
    assert "qaic-compile on PATH" in str(error.value) and "--dry-run" in error.value.hint


@pytest.mark.parametrize("case,message", [
    ("ctx", "does not match the model's KV inputs"),
    ("unwritable", "cannot write the compile folder"),
    ("prefill", "longer than the cache"),
    ("cb", "continuous batching"),
    ("flag", "does not start with '-'"),
])
def test_clear_errors(models, tmp_path, case, message):
    blocker = tmp_path / "file"
    blocker.write_text("")
    model, options, folder = models["kv"], CompileOptions(dry_run=True), tmp_path / "out"
    if case == "ctx":
        model, options = models["bound"], CompileOptions(dry_run=True, ctx_len=128)
    elif case == "unwritable":
        folder = blocker / "sub"
    elif case == "prefill":
        options = CompileOptions(dry_run=True, prefill_len=256)
    elif case == "cb":
        options = CompileOptions(dry_run=True, full_batch_size=4)
    elif case == "flag":
        options = CompileOptions(dry_run=True, extra_flags=("mos=2",))
    with pytest.raises(QeffError, match=message):
        compile_model(model, folder, options)


def test_cli_dry_run(models, tmp_path, monkeypatch, capsys):
    code, out, err = invoke(cli.main, ["compile", models["kv"], "-o", tmp_path / "c", "--dry-run", "--devices", "0,1"],
                            monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "-mdp-load-partition-config=" in text and "dry run: wrote" in text
    assert (tmp_path / "c" / "mdp_ts_2.json").exists()
    assert os.path.exists(tmp_path / "c" / "command.txt")


def test_node_precision_yaml_from_fp16clip(tmp_path, standin):
    """A model whose fp16clip calibration listed values for fp32: the YAML goes into the compile
    folder and -node-precision-info; a static model without a KV cache gets neither
    -retained-state, specializations nor custom IO."""
    import numpy as np
    import onnx

    from tests.passes.test_fp16clip import _OVERFLOW, _model

    proto = _model(_OVERFLOW, {"w": np.eye(8, dtype=np.float32) * 400.0, "big": np.array(1000.0, np.float32)})
    onnx.save(proto, tmp_path / "m.onnx")
    optimize(tmp_path / "m.onnx", "fp16clip:calibrate=2", output=tmp_path / "safe.onnx")
    result = compile_model(tmp_path / "safe.onnx", tmp_path / "out")
    folder = str((tmp_path / "out").resolve())
    assert result.command[1:] == [
        "-aic-hw", "-aic-hw-version=ai100", f"-m={(tmp_path / 'safe.onnx').resolve()}", "-convert-to-fp16",
        "-aic-num-cores=16", f"-node-precision-info={folder}/node_precision_info.yaml", f"-aic-binary-dir={folder}/qpc"]
    assert (tmp_path / "out" / "node_precision_info.yaml").read_text() == "FP32NodeInstanceNames:\n  - sq\n"
    assert result.status == "compiled"


def test_custom_io_on_request(models, tmp_path):
    """--custom-io adds entries (and overrides a KV entry's precision); unknown names and
    precisions are refused."""
    command, files = _dry(models["kv"], tmp_path / "io", custom_io={"past_key.0": "mxint8", "logits": "float16"})
    assert files["custom_io.yaml"].startswith(" - IOName: past_key.0\n   Precision: mxint8\n\n"
                                              " - IOName: past_key.0_RetainedState\n   Precision: float16\n\n")
    assert files["custom_io.yaml"].endswith(" - IOName: logits\n   Precision: float16\n\n")
    for bad, message in [({"nope": "float16"}, "no input or output 'nope'"), ({"logits": "int4"}, "unknown precision")]:
        with pytest.raises(QeffError, match=message):
            compile_model(models["kv"], tmp_path / "bad", CompileOptions(dry_run=True, custom_io=bad))
