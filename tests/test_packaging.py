"""The stage folders must install under the qeff namespace from a plain wheel, not only editable."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{done.stderr[-2000:]}")
    (path,) = out.glob("qeff_opt-*.whl")
    return path


def test_wheel_maps_stage_folders_into_qeff(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "qeff/__init__.py", "qeff/entry.py", "qeff/cli.py", "qeff/errors.py",
        "qeff/frontend/export.py", "qeff/passes/cleanup.py", "qeff/passes/fold.py",
        "qeff/backend_aic/__init__.py", "qeff/runtime/__init__.py", "qeff/evaluation/evaluate.py",
        "qeff/tune/__init__.py", "qeff/tune/search.py",
        # the reference model is package data: qeff export --reference and qeff eval need it installed
        "qeff/reference/train.py", "qeff/reference/checkpoint/model.safetensors",
        "qeff/reference/checkpoint/config.json", "qeff/reference/checkpoint/tokenizer.json",
        "qeff/reference/checkpoint/heldout.txt",
    ):
        assert module in names, module
    assert not any(n.startswith(("tests/", "bench/", "passes/", "frontend/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "qeff-opt = qeff.entry:opt_main" in text and "qeff = qeff.entry:main" in text


def test_wheel_install_imports_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, timeout=300, capture_output=True,
    )
    # Run from an empty folder with only the installed copy first on the path, so the
    # repository's own folders cannot be what gets imported.
    code = (
        "import qeff, qeff.passes, qeff.frontend, qeff.backend_aic, qeff.runtime;"
        "assert qeff.__file__.startswith(%r), qeff.__file__;"
        "assert qeff.passes.__file__.startswith(%r);"
        "from qeff.entry import opt_main; import sys; sys.argv=['qeff-opt','--list-passes']; opt_main()"
    ) % (str(target), str(target))
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cleanup" in done.stdout and "fold" in done.stdout
