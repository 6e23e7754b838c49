"""backend_aic against hostile or careless input: a manifest that names files outside the model's
folder, a compiler given by a relative path, a compiler that leaves helpers running when it is
stopped, option values no compiler takes, and refusals that must leave no compile folder behind."""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import stat
import time
from pathlib import Path

import onnx
import pytest

from qeff import cli
from qeff.backend_aic import CompileOptions, compile_model
from qeff.backend_aic import compile as compile_mod
from qeff.backend_aic import model_info as model_info_mod
from qeff.backend_aic.options import INT_MAX, resolve_options
from qeff.contract import Manifest
from qeff.errors import QeffError
from qeff.optimizer import optimize
from tests.backend_aic.standin import write_standin
from tests.cli.test_cli import invoke

_STATIC = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[1, 4] x) => (float[1, 4] y) { y = Identity(x) }"""
_NODE_LIST = "FP32NodeInstanceNames:\n  - y\n"


# -- helpers -----------------------------------------------------------------------------------

def _static_model(folder: Path, manifest: dict | None = None) -> Path:
    """A model without a KV cache in ``folder``; ``manifest`` (if given) is written beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(onnx.parser.parse_model(_STATIC), path)
    if manifest is not None:
        (folder / "m.qeff.json").write_text(json.dumps({"format": "qeff-manifest/1", **manifest}))
    return path


def _secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A file outside every model folder, holding bytes that appear nowhere else."""
    token = ("SECRET-" + secrets.token_hex(16)).encode()
    path = tmp_path / "private" / "secret.yaml"
    path.parent.mkdir()
    # It even looks like what the compiler wants, so only the path check can refuse it.
    path.write_bytes(b"FP32NodeInstanceNames:\n  - " + token + b"\n")
    return path, token


def _files_holding(folder: Path, token: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and token in p.read_bytes()]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def standin(tmp_path, monkeypatch) -> Path:
    path = write_standin(tmp_path / "sdk")
    monkeypatch.setenv("QAIC_COMPILER", str(path))
    monkeypatch.setenv("STANDIN_COUNT", str(tmp_path / "runs.txt"))
    return path


def _runs(tmp_path: Path) -> int:
    runs = tmp_path / "runs.txt"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


# -- 1. files a manifest names must lie beside the model ---------------------------------------

def test_a_file_beside_the_model_is_copied(tmp_path, standin):
    """The control: a plain name of a regular file beside the model (directly, or through a link
    that stays in the folder) reaches the compile folder and the compiler."""
    model = _static_model(tmp_path / "model", {"node_precision_info": "m.fp32.yaml"})
    (tmp_path / "model" / "m.fp32.yaml").write_text(_NODE_LIST)
    result = compile_model(model, tmp_path / "out")
    assert result.status == "compiled"
    assert (tmp_path / "out" / "node_precision_info.yaml").read_text() == _NODE_LIST
    (tmp_path / "model" / "m.qeff.json").write_text(
        json.dumps({"format": "qeff-manifest/1", "node_precision_info": "alias.yaml"}))
    (tmp_path / "model" / "alias.yaml").symlink_to("m.fp32.yaml")
    assert compile_model(model, tmp_path / "out2").status == "compiled"
    assert (tmp_path / "out2" / "node_precision_info.yaml").read_text() == _NODE_LIST


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "link-via-dotdot"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_manifest_cannot_name_a_file_outside_the_model_folder(tmp_path, standin, how, dry_run):
    secret, token = _secret(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    if how == "absolute":
        value = str(secret)
    elif how == "dotdot":
        value = "../private/secret.yaml"
    elif how == "link":
        value = "m.fp32.yaml"
        (folder / value).symlink_to(secret)
    else:  # a relative link that climbs out
        value = "m.fp32.yaml"
        (folder / value).symlink_to("../private/secret.yaml")
    model = _static_model(folder, {"node_precision_info": value})
    out = tmp_path / "out" / "nested"
    with pytest.raises(QeffError) as error:
        compile_model(model, out, CompileOptions(dry_run=dry_run))
    text = str(error.value)
    assert "node_precision_info" in text and value in text
    assert token.decode() not in text
    assert not (tmp_path / "out").exists()  # refused before anything was created
    assert _runs(tmp_path) == 0


def test_a_refused_manifest_leaves_an_existing_compile_folder_as_it_was(tmp_path, standin):
    """A compile folder from an earlier compile keeps exactly its files; none holds the secret."""
    secret, token = _secret(tmp_path)
    model = _static_model(tmp_path / "model", {"node_precision_info": "m.fp32.yaml"})
    (tmp_path / "model" / "m.fp32.yaml").write_text(_NODE_LIST)
    out = tmp_path / "out"
    compile_model(model, out)
    before = _tree(out)
    (tmp_path / "model" / "m.fp32.yaml").unlink()
    (tmp_path / "model" / "m.fp32.yaml").symlink_to(secret)
    with pytest.raises(QeffError, match="node_precision_info names 'm.fp32.yaml', a link that leads outside"):
        compile_model(model, out, CompileOptions(num_cores=8))
    assert _tree(out) == before
    assert _files_holding(out, token) == []
    assert _runs(tmp_path) == 1


def test_the_backend_checks_the_name_even_when_the_manifest_reader_did_not(tmp_path, standin, monkeypatch):
    """A Manifest made in code (or read by an older reader) reaches the backend unchecked: the
    backend refuses a path on its own."""
    secret, token = _secret(tmp_path)
    model = _static_model(tmp_path / "model")
    for value in (str(secret), "../private/secret.yaml", "..", ".", ""):
        monkeypatch.setattr(model_info_mod, "read_manifest", lambda _p, v=value: Manifest(node_precision_info=v))
        with pytest.raises(QeffError, match="node_precision_info") as error:
            compile_model(model, tmp_path / "out")
        assert repr(value) in str(error.value)
        assert not (tmp_path / "out").exists()
    info = model_info_mod.read_model_info(model)
    info.manifest = Manifest(node_precision_info=str(secret))
    with pytest.raises(QeffError, match="not the plain name of a file"):
        resolve_options(CompileOptions(), info)
    assert _runs(tmp_path) == 0


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "loop"])
def test_a_named_file_must_be_a_regular_file(tmp_path, standin, kind):
    folder = tmp_path / "model"
    model = _static_model(folder, {"node_precision_info": "m.fp32.yaml"})
    target = folder / "m.fp32.yaml"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)  # reading it would block the compile forever
    elif kind == "loop":
        target.symlink_to("m.fp32.yaml")
    message = {"missing": "does not exist", "folder": "not a regular file", "fifo": "not a regular file",
               "loop": "cannot be followed"}[kind]
    with pytest.raises(QeffError, match=message):
        compile_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_manifest_naming_an_outside_file(tmp_path, monkeypatch, capsys):
    secret, token = _secret(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.fp32.yaml").symlink_to(secret)
    model = _static_model(tmp_path / "model", {"node_precision_info": "m.fp32.yaml"})
    code, out, err = invoke(cli.main, ["compile", model, "-o", tmp_path / "out", "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "node_precision_info" in err and "Traceback" not in err
    assert token.decode() not in out + err
    assert not (tmp_path / "out").exists()


# -- 2. a relative compiler path -----------------------------------------------------------------

def test_a_relative_compiler_path_runs(tmp_path, monkeypatch, models_kv):
    """The compiler runs in the compile folder: ./sdk/qaic-compile must mean the caller's ./sdk."""
    monkeypatch.delenv("QAIC_COMPILER", raising=False)
    work = tmp_path / "work"
    write_standin(work / "sdk")
    exe = write_standin(work / "old", "qaic-exec")
    monkeypatch.chdir(work)
    result = compile_model(models_kv, "out", CompileOptions(compiler="./sdk/qaic-compile"))
    assert result.status == "compiled" and os.path.isabs(result.command[0])
    assert os.path.samefile(result.command[0], work / "sdk" / "qaic-compile")
    assert (work / "out" / "qpc" / "programqpc.bin").read_bytes() == b"stand-in qpc compile"
    monkeypatch.setenv("QAIC_COMPILER", "old/qaic-exec")
    result = compile_model(models_kv, "out-env")
    assert os.path.isabs(result.command[0]) and os.path.samefile(result.command[0], exe)
    assert "-compile-only" in result.command
    assert (work / "out-env" / "qpc" / "programqpc.bin").read_bytes() == b"stand-in qpc exec"


def test_a_bare_compiler_name_is_looked_up_on_path(tmp_path, monkeypatch, models_kv):
    exe = write_standin(tmp_path / "bin")
    monkeypatch.delenv("QAIC_COMPILER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.chdir(tmp_path)
    result = compile_model(models_kv, "out", CompileOptions(compiler="qaic-compile"))
    assert os.path.isabs(result.command[0]) and os.path.samefile(result.command[0], exe)
    assert result.status == "compiled"


def test_cli_relative_compiler(tmp_path, monkeypatch, capsys, models_kv):
    monkeypatch.delenv("QAIC_COMPILER", raising=False)
    write_standin(tmp_path / "sdk")
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(cli.main, ["compile", models_kv, "-o", "c", "--compiler", "./sdk/qaic-compile"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "c" / "qpc" / "programqpc.bin").is_file()


@pytest.fixture(scope="module")
def models_kv(tiny_export, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening-models")
    return optimize(tiny_export("llama"), "kv:ctx_len=128,prefill_len=32", output=folder / "kv.onnx").output


# -- 3. stopping the compiler stops what it started ---------------------------------------------

_SPAWNING = """#!/bin/sh
echo $$ > leader.pid
sleep 60 &
echo $! > child.pid
wait
"""


def _spawning_compiler(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qaic-compile"
    path.write_text(_SPAWNING)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _dead(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet (an orphan's reaper may be slow in a container)."""
    proc = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return proc.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.05)
    return _dead(pid)


def _pids(folder: Path) -> list[int]:
    """The pids the script wrote so far (a file caught half-written counts as not yet there)."""
    pids = []
    for name in ("leader.pid", "child.pid"):
        try:
            pids.append(int((folder / name).read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if not _dead(pid):
            os.kill(pid, signal.SIGKILL)


def test_timeout_stops_the_compiler_and_its_children(tmp_path, models_kv):
    exe = _spawning_compiler(tmp_path / "sdk")
    out = tmp_path / "out"
    pids: list[int] = []
    try:
        with pytest.raises(QeffError, match="did not finish within 1.5 s"):
            compile_model(models_kv, out, CompileOptions(compiler=str(exe), timeout=1.5))
        pids = _pids(out)
        assert len(pids) == 2, "the script did not start its child in time"
        assert all(_wait_dead(pid) for pid in pids), pids
    finally:
        _kill_leftovers(pids)


class _Console:
    """A console whose spinner raises ``error`` once the compiler's child is running."""

    def __init__(self, folder: Path, error: BaseException) -> None:
        self.folder, self.error, self.stopped = folder, error, False

    def status(self, _text):
        return self

    def start(self):
        pass

    def update(self, _text):
        if len(_pids(self.folder)) == 2:
            raise self.error

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("the screen went away")])
def test_an_interrupt_while_waiting_stops_the_compiler_and_its_children(tmp_path, models_kv, error):
    exe = _spawning_compiler(tmp_path / "sdk")
    out = tmp_path / "out"
    console = _Console(out, error)
    pids: list[int] = []
    try:
        with pytest.raises(type(error)):
            compile_model(models_kv, out, CompileOptions(compiler=str(exe), timeout=30), console=console)
        pids = _pids(out)
        assert len(pids) == 2 and console.stopped
        assert all(_wait_dead(pid) for pid in pids), pids
    finally:
        _kill_leftovers(pids)


# -- 4. option values no compiler takes, refused before the model is even read ------------------

@pytest.mark.parametrize("options,message", [
    ({"timeout": -1}, "--timeout must be a finite number"),
    ({"timeout": 0}, "--timeout must be a finite number"),
    ({"timeout": math.nan}, "--timeout must be a finite number"),
    ({"timeout": math.inf}, "--timeout must be a finite number"),
    ({"timeout": True}, "--timeout must be a finite number"),
    ({"num_cores": 0}, "--num-cores must be between 1 and"),
    ({"num_cores": -4}, "--num-cores must be between 1 and"),
    ({"num_cores": 2.5}, "--num-cores must be a whole number"),
    ({"batch_size": 0}, "--batch-size must be between 1 and"),
    ({"batch_size": 2**31}, "--batch-size must be between 1 and 2147483647, got 2147483648"),
    ({"prefill_len": 0}, "--prefill-len must be between"),
    ({"prefill_len": 2**31}, "--prefill-len must be between"),
    ({"ctx_len": -1}, "--ctx-len must be between"),
    ({"ctx_len": 2**40}, "--ctx-len must be between"),
    ({"full_batch_size": 0}, "--full-batch-size must be between"),
    ({"full_batch_size": 2**31}, "--full-batch-size must be between"),
    ({"devices": (0, -1)}, "--devices must be between 0 and"),
    ({"devices": (2**31,)}, "--devices must be between 0 and"),
    ({"devices": (1, 0, 1)}, "each device id once"),
    ({"mos": 0}, "--mos must be between 1 and"),
    ({"mos": -1}, "--mos must be between 1 and"),
    ({"ols": -2}, "--ols must be between 1 and"),
    ({"stats_batchsize": 0}, "--stats-batchsize must be between 1 and"),
    ({"define_symbols": {"sequence_length": 0}}, "--define-symbol sequence_length must be between 1 and"),
    ({"define_symbols": {"sequence_length": -5}}, "--define-symbol sequence_length must be between 1 and"),
    ({"prefill_len": 256, "ctx_len": 128}, "--prefill-len 256 is longer than the cache"),
])
def test_bad_option_values_are_refused_first(tmp_path, standin, options, message):
    """The model does not exist: the option is refused before it is looked for."""
    out = tmp_path / "out"
    with pytest.raises(QeffError, match=message) as error:
        compile_model(tmp_path / "missing.onnx", out, CompileOptions(**options))
    assert "\n" not in str(error.value) and error.value.hint
    assert not out.exists() and _runs(tmp_path) == 0


def test_the_limits_themselves_are_accepted(tmp_path):
    """1 and 2**31-1 are in range (a dry run of a static model takes batch and symbol values)."""
    model = _static_model(tmp_path / "model")
    result = compile_model(model, tmp_path / "out", CompileOptions(dry_run=True, num_cores=1, mos=1, ols=INT_MAX,
                                                                   stats_batchsize=INT_MAX, devices=(0,),
                                                                   timeout=0.5))
    assert f"-ols={INT_MAX}" in result.command and "-aic-num-cores=1" in result.command


def test_a_manifest_size_beyond_32_bits_is_refused(tmp_path, models_kv):
    folder = tmp_path / "model"
    folder.mkdir()
    model = folder / "kv.onnx"
    model.write_bytes(models_kv.read_bytes())
    manifest = json.loads(models_kv.with_name("kv.qeff.json").read_text())
    manifest["ctx_len"] = 2**40
    (folder / "kv.qeff.json").write_text(json.dumps(manifest))
    with pytest.raises(QeffError, match=r"cache length \(ctx_len\) from the manifest or the model must be between"):
        compile_model(model, tmp_path / "out", CompileOptions(dry_run=True))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_duplicate_devices_in_one_line(tmp_path, monkeypatch, capsys, models_kv):
    code, _, err = invoke(cli.main, ["compile", models_kv, "-o", tmp_path / "out", "--dry-run", "--devices", "0,0"],
                          monkeypatch, capsys)
    assert code == 2 and "each device id once" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- 5. refusals leave no compile folder behind --------------------------------------------------

@pytest.mark.parametrize("case", ["custom-io", "define-symbol", "ctx", "no-compiler"])
def test_refusals_after_reading_the_model_create_nothing(tmp_path, monkeypatch, models_kv, case):
    out = tmp_path / "a" / "b" / "out"
    options = {"custom-io": CompileOptions(custom_io={"nope": "float16"}),
               "define-symbol": CompileOptions(define_symbols={"batch_size": 2}),
               "ctx": CompileOptions(prefill_len=200),
               "no-compiler": CompileOptions()}[case]
    monkeypatch.delenv("QAIC_COMPILER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("qeff.backend_aic.compiler.DEFAULT_PATHS", (str(tmp_path / "none/qaic-compile"),))
    with pytest.raises(QeffError):
        compile_model(models_kv, out, options)
    assert not (tmp_path / "a").exists()


def test_a_failed_write_takes_back_the_folder_it_created(tmp_path, standin, monkeypatch, models_kv):
    def full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_mod, "_write_params", full)
    with pytest.raises(QeffError, match="No space left on device"):
        compile_model(models_kv, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(QeffError, match="No space left on device"):
        compile_model(models_kv, existing / "out")
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert _runs(tmp_path) == 0


def test_a_failed_compile_keeps_its_folder_and_log(tmp_path, standin, monkeypatch, models_kv):
    """Once the compiler has run, the folder is the user's evidence: it stays."""
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(QeffError, match="exit code 3"):
        compile_model(models_kv, tmp_path / "new" / "out")
    assert "out of memory" in (tmp_path / "new" / "out" / "compile.log").read_text()
