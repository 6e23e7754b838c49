"""A stand-in for the Cloud AI compiler, written into the tests' temp folders as an executable.

It checks the flags it receives the way the real compiler of its flavour would (qaic-compile:
``-aic-hw-version`` ai100/ai200 and no ``-compile-only``; qaic-exec: ``-compile-only`` and 2.0),
checks the files it is pointed at, and writes ``<binary dir>/programqpc.bin``. Environment:
``STANDIN_FAIL`` (exit 3 after some log lines), ``STANDIN_SLEEP`` (seconds to sleep first),
``STANDIN_OLD_SDK`` (reject the named specializations format as SDKs before it did),
``STANDIN_COUNT`` (a file that gets one line per run), ``STANDIN_RECORD_FLAGS`` (also write the
flags it got as ``<binary dir>/standin-flags.json``, for a stand-in runner to read).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SCRIPT = r'''
import json, os, sys, time
from pathlib import Path

def fail(message, code=1):
    print("ERROR: " + message, flush=True)
    sys.exit(code)

flavour = "exec" if Path(sys.argv[0]).name.startswith("qaic-exec") else "compile"
flags = {}
for arg in sys.argv[1:]:
    if not arg.startswith("-"):
        fail(f"unexpected argument {arg}")
    key, _, value = arg.partition("=")
    flags[key] = value
if os.environ.get("STANDIN_COUNT"):
    with open(os.environ["STANDIN_COUNT"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
print(f"stand-in {flavour} compiler: {len(flags)} flags", flush=True)
if "-aic-hw" not in flags:
    fail("-aic-hw is required")
versions = {"compile": ("ai100", "ai200"), "exec": ("2.0",)}[flavour]
if flags.get("-aic-hw-version") not in versions:
    fail(f"-aic-hw-version must be one of {versions}, got {flags.get('-aic-hw-version')}")
if flavour == "exec" and "-compile-only" not in flags:
    fail("qaic-exec needs -compile-only to compile")
if flavour == "compile" and "-compile-only" in flags:
    fail("Unknown command line argument '-compile-only'")
model = Path(flags.get("-m", ""))
if not model.is_file() or model.suffix != ".onnx":
    fail(f"-m must name an .onnx file, got {model}")
for key in ("-aic-num-cores", "-mos", "-ols"):
    if key in flags and not flags[key].isdigit():
        fail(f"{key} takes a number")
spec = flags.get("-network-specialization-config")
if spec is not None:
    entries = json.loads(Path(spec).read_text())["specializations"]
    for entry in entries:
        if "symbols" in entry and os.environ.get("STANDIN_OLD_SDK"):
            fail("[json.exception.type_error.302] type must be string, but is object")
        values = entry["symbols"] if "symbols" in entry else entry
        if not all(isinstance(v, str) for v in values.values()):
            fail("specialization values must be strings")
custom = flags.get("-custom-IO-list-file")
if custom is not None:
    lines = [l.strip() for l in Path(custom).read_text().splitlines() if l.strip()]
    if not lines or len(lines) % 2:
        fail("custom IO list: IOName/Precision pairs expected")
    for name, precision in zip(lines[::2], lines[1::2]):
        if not name.startswith("- IOName: ") or precision.split(": ")[-1] not in ("float16", "bfloat16", "mxint8", "float"):
            fail(f"custom IO list: bad entry {name} / {precision}")
mdp = flags.get("-mdp-load-partition-config")
if mdp is not None and not json.loads(Path(mdp).read_text())["partitions"]:
    fail("partition config without partitions")
npi = flags.get("-node-precision-info")
if npi is not None and not Path(npi).read_text().startswith("FP32NodeInstanceNames:"):
    fail("node precision info: FP32NodeInstanceNames expected")
binary = Path(flags.get("-aic-binary-dir", ""))
if not flags.get("-aic-binary-dir"):
    fail("-aic-binary-dir is required")
if binary.exists():
    fail(f"{binary} already exists")
time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
if os.environ.get("STANDIN_FAIL"):
    for i in range(30):
        print(f"compiling node {i}", flush=True)
    fail("Graph compilation failed: out of memory on core 3", code=3)
binary.mkdir(parents=True)
(binary / "programqpc.bin").write_bytes(b"stand-in qpc " + flavour.encode())
if os.environ.get("STANDIN_RECORD_FLAGS"):
    (binary / "standin-flags.json").write_text(json.dumps(flags))
print("Compilation complete", flush=True)
'''


def write_standin(folder: Path, name: str = "qaic-compile") -> Path:
    """An executable stand-in compiler called ``name`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{SCRIPT}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


__all__ = ["write_standin", "SCRIPT", "os"]
