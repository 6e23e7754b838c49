"""Interrupts and concurrency: an output is the old one or the new one, never a mix.

The commit is interrupted deterministically through ``qeff.common.atomic.commit_hook``, which
sends the signal to this process at a known step of the commit (before anything moved, and
between the data/manifest renames and the model's rename).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qeff import cli
from qeff.common import atomic
from qeff.passes import as_ir_model, save_model
from tests.adversarial.test_corpus import invoke, tree
from tests.graphs import TWO_MATMULS, data_file, parse, run

RNG = np.random.default_rng(3)
W1 = RNG.standard_normal((64, 64)).astype(np.float32)
W2 = RNG.standard_normal((64, 64)).astype(np.float32)
X = RNG.standard_normal((2, 64)).astype(np.float32)


def _model(work: Path) -> Path:
    return save_model(as_ir_model(parse(TWO_MATMULS, {"w1": W1, "w2": W2})), work / "m.onnx", external_data=True)


def _first_output(work: Path, monkeypatch, capsys) -> Path:
    """o.onnx written by a plain run: what an interrupted second run must leave intact."""
    code, _, err = invoke(cli.opt_main, [_model(work), "--passes", "cleanup", "-o", work / "o.onnx", "-q"],
                          monkeypatch, capsys)
    assert code == 0, err
    return work / "o.onnx"


@pytest.fixture
def hook(monkeypatch):
    def at(step: str, signum: int) -> None:
        def send(name: str) -> None:
            if name == step:
                os.kill(os.getpid(), signum)
        monkeypatch.setattr(atomic, "commit_hook", send)
    yield at
    # The CLI installed its handlers for this process; give pytest its own back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_before_the_commit_leaves_the_old_output(signum, code, word, tmp_path, monkeypatch, capsys, hook):
    out = _first_output(tmp_path, monkeypatch, capsys)
    before = tree(tmp_path)
    hook("before", signum)
    got, _, err = invoke(cli.opt_main, [tmp_path / "m.onnx", "--passes", "mxfp6", "-o", out], monkeypatch, capsys)
    assert got == code
    assert err.strip() == f"qeff-opt: {word}; nothing was written"
    assert tree(tmp_path) == before  # the old model, data and manifest, and no staging left


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_inside_the_commit_finishes_it(signum, code, word, tmp_path, monkeypatch, capsys, hook):
    out = _first_output(tmp_path, monkeypatch, capsys)
    old_data = data_file(out)
    # The data file and the manifest are in place, the model is not: the signal waits.
    hook("companions", signum)
    got, _, err = invoke(cli.opt_main, [tmp_path / "m.onnx", "--passes", "mxfp6", "-o", out, "--external-data"],
                         monkeypatch, capsys)
    assert got == code
    assert err.strip() == f"qeff-opt: {word}; already written: {out}"
    # The new model with its own data and manifest; the old data file is gone.
    assert not old_data.exists() and data_file(out).exists()
    manifest = json.loads(out.with_name("o.qeff.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["mxfp6"]
    history = json.loads({p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
                         ["qeff.passes"])
    assert [h["name"] for h in history] == ["mxfp6"]
    y = run(out, {"x": X})["y"]
    exact = X @ W1 @ W2
    assert not np.allclose(y, exact, atol=1e-6) and np.allclose(y, exact, rtol=0.2, atol=0.2 * np.abs(exact).max())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_staging_left_by_a_killed_run_is_removed(tmp_path, monkeypatch, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    prefix = f"{atomic.STAGING_PREFIX}{atomic._HOST}-{pid}-"
    stale = tmp_path / f"{prefix}abc.tmp"
    stale.mkdir()
    (stale / "o.onnx").write_bytes(b"half a model")
    stale_file = tmp_path / f"{prefix}def.tmp"
    elsewhere = tmp_path / f"{atomic.STAGING_PREFIX}otherhost-{pid}-ghi.tmp"  # another machine's: kept
    elsewhere.mkdir()
    stale_file.write_text("half a manifest")
    _first_output(tmp_path, monkeypatch, capsys)
    assert not stale.exists() and not stale_file.exists()
    assert elsewhere.exists()


def test_two_runs_writing_one_output_leave_a_consistent_pair(tmp_path):
    src = _model(tmp_path)
    out = tmp_path / "o.onnx"
    exe = Path(sys.executable).with_name("qeff-opt")
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", "from qeff.entry import opt_main; opt_main()"]
    runs = [subprocess.Popen([*command, str(src), "--passes", passes, "-o", str(out), "-q"],
                             stderr=subprocess.PIPE, text=True) for passes in ("cleanup", "mxfp6", "fold")]
    for r in runs:
        assert r.wait(timeout=300) == 0, r.stderr.read()
    manifest = json.loads(out.with_name("o.qeff.json").read_text())
    history = json.loads({p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
                         ["qeff.passes"])
    # Whichever run committed last, the model, its data and the manifest are from one run.
    assert [p["name"] for p in manifest["passes"]] == [h["name"] for h in history]
    y = run(out, {"x": X})["y"]
    exact = X @ W1 @ W2
    if history[0]["name"] == "mxfp6":
        assert np.allclose(y, exact, rtol=0.2, atol=0.2 * np.abs(exact).max())
    else:
        np.testing.assert_allclose(y, exact, rtol=1e-4, atol=1e-4)
    proto = onnx.load(str(out), load_external_data=False)
    data = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.")) == sorted(["o.onnx", "o.qeff.json", *data])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_IMPORT_INTERRUPT = """
import importlib.abc, os, signal, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "qeff.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["qeff-opt", "--help"]
from qeff.entry import opt_main
opt_main()
"""


def test_an_interrupt_while_importing_prints_one_line():
    done = subprocess.run([sys.executable, "-c", _IMPORT_INTERRUPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert done.stderr.strip() == "qeff-opt: interrupted; nothing was written"


def test_onnxruntime_logs_stay_off_stderr(tmp_path):
    # A model onnxruntime refuses at load (an operator it does not know): its C++ logger would
    # print an "[E:onnxruntime:...]" line to the process's stderr before the exception.
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]),
        opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("nowhere", 1)], ir_version=10)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    code = "import sys; sys.argv = ['qeff', 'bench', sys.argv[1], '--duration', '0.1']; " \
           "from qeff.entry import main; main()"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qeff: error:"), done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
