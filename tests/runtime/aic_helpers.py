"""Fixtures and helpers for the tests of the Cloud AI runtime binding (qeff.runtime._qaicrt, AicSession).

- ``standin_lib``: ``tests/runtime/standin_qaic.c`` compiled into a stand-in ``libQAic.so``,
  against a header extracted from the prototype block of ``runtime/_qaicrt.c`` (so a prototype
  that drifts between the two fails to compile);
- ``aic_folder``: a compile folder for a tiny KV Llama (``kv:ctx_len=32``, a dry-run compile)
  with a stand-in ``qpc/programqpc.bin`` describing its bindings (see the stand-in's comment);
- ``expected_step``: the stand-in's program in NumPy, the independent reference for its outputs.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
STANDIN_SOURCE = HERE / "standin_qaic.c"
API_BEGIN = "/* >>> QAIC C API (inferred) >>>"
API_END = "/* <<< QAIC C API (inferred) <<< */"
VOCAB_ROW_PERIOD = 7  # logits[b, l, v] uses v % 7


def binding_source() -> Path:
    """runtime/_qaicrt.c of the installed (editable) package."""
    import qeff.runtime

    return Path(qeff.runtime.__file__).resolve().parent / "_qaicrt.c"


def extract_api_header(source: Path) -> str:
    """The binding's self-contained block of inferred types and prototypes, as a header."""
    text = source.read_text()
    start, end = text.index(API_BEGIN), text.index(API_END) + len(API_END)
    return "#ifndef QAIC_API_H\n#define QAIC_API_H\n" + text[start:end] + "\n#endif\n"


def find_c_compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def build_standin(folder: Path) -> Path:
    """Compile the stand-in into ``folder/libQAic.so`` (skips the test without a C compiler)."""
    compiler = find_c_compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the stand-in libQAic.so")
    source = binding_source()
    if not source.is_file():
        pytest.skip(f"the binding's source {source} is not installed next to the package (not an editable install)")
    (folder / "qaic_api.h").write_text(extract_api_header(source))
    library = folder / "libQAic.so"
    command = [compiler, "-shared", "-fPIC", "-O1", "-g", "-std=c11", "-Wall", "-Werror", f"-I{folder}",
               "-o", str(library), str(STANDIN_SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"the stand-in does not compile:\n{result.stderr}"
    return library


def model_of(folder: Path) -> Path:
    command = json.loads((folder / "qeff-compile.json").read_text())["command"]
    return Path(next(arg[3:] for arg in command if arg.startswith("-m=")))


def write_standin_qpc(folder: Path) -> Path:
    """``folder/qpc/programqpc.bin`` for the stand-in: symbols, specializations and bindings
    (inputs then outputs in graph order, the KV precision from custom_io.yaml), read with
    ``onnx`` rather than the session's ``onnx_ir`` code so the two stay independent."""
    import onnx

    graph = onnx.load(str(model_of(folder)), load_external_data=False).graph
    custom = dict(re.findall(r"IOName:\s*(\S+)\s+Precision:\s*(\S+)", (folder / "custom_io.yaml").read_text()))
    entries = json.loads((folder / "specializations.json").read_text())["specializations"]
    specs = [e.get("symbols", e) for e in entries]
    symbols = list(specs[0])
    lines = ["QEFF-STANDIN-QPC 1", f"symbols {len(symbols)} {' '.join(symbols)}", f"specs {len(specs)}"]
    lines += [" ".join(str(spec[s]) for s in symbols) for spec in specs]
    values = [("in", v) for v in graph.input] + [("out", v) for v in graph.output]
    lines.append(f"bindings {len(values)}")
    for direction, value in values:
        elem = 2 if custom.get(value.name) == "float16" else \
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        lines.append(f"{direction} {value.name} {elem} {len(dims)} {' '.join(dims)}")
    qpc = folder / "qpc" / "programqpc.bin"
    qpc.parent.mkdir(exist_ok=True)
    qpc.write_text("\n".join(lines) + "\n")
    return qpc


def make_compile_folder(model: Path, folder: Path) -> Path:
    from qeff.backend_aic import CompileOptions, compile_model

    compile_model(model, folder, CompileOptions(dry_run=True))
    write_standin_qpc(folder)
    return folder


def counter(library: Path, name: str) -> int:
    """A stand-in counter: live, runs, retained_bytes_in, retained_bytes_out (same handle as the binding's)."""
    lib = ctypes.CDLL(str(library))
    lib.qaicStandinCounter.restype = ctypes.c_longlong
    lib.qaicStandinCounter.argtypes = [ctypes.c_char_p]
    return lib.qaicStandinCounter(name.encode())


def expected_step(state: Mapping[str, np.ndarray], input_ids: np.ndarray, position_ids: np.ndarray,
                  logits_shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The stand-in's program in NumPy: (new retained state, logits). ``state`` is in binding order."""
    new = {name: array.copy() for name, array in state.items()}
    for k, array in enumerate(new.values()):
        capacity = array.shape[2]
        for b, t in np.ndindex(*input_ids.shape):
            p = position_ids[b, t]
            if 0 <= p < capacity:
                array[b, :, p, :] = input_ids[b, t] + k
    batch, rows, vocab = logits_shape
    total = sum(a.astype(np.float64).reshape(batch, -1).sum(axis=1) for a in new.values())
    last = np.maximum(position_ids.max(axis=1), -1)
    first_max = position_ids.argmax(axis=1)
    last_id = np.where(last >= 0, input_ids[np.arange(batch), first_max], 0)
    per_vocab = (np.arange(vocab) % VOCAB_ROW_PERIOD)[None, :] * (last + 1)[:, None]
    logits = (np.asarray(total)[:, None] + per_vocab + last_id[:, None]).astype(np.float32)
    return new, np.broadcast_to(logits[:, None, :], (batch, rows, vocab)).copy()


# ---- fixtures (imported by the test modules) ----------------------------------------------------


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("standin-qaic"))


@pytest.fixture(scope="session")
def kv_model(tiny_export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qeff.optimizer import optimize

    folder = tmp_path_factory.mktemp("aic-model")
    return Path(optimize(tiny_export("llama"), "kv:ctx_len=32", output=folder / "kv.onnx").output)


@pytest.fixture(scope="session")
def aic_folder(kv_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_compile_folder(kv_model, tmp_path_factory.mktemp("aic-compile"))


# ---- a hand-written QPC for the binding-level tests (no ONNX model, no torch) ------------------

#: batch 2, a prefill (seq 4) and a decode (seq 1) specialization, a float16 and a float32 cache.
SMALL_QPC = """QEFF-STANDIN-QPC 1
symbols 3 batch_size seq_len ctx_len
specs 2
2 4 8
2 1 8
bindings 7
in input_ids 8 2 batch_size seq_len
in position_ids 8 2 batch_size seq_len
in past_key.0 2 4 batch_size 2 ctx_len 4
in past_value.0 4 4 batch_size 2 ctx_len 4
out logits 4 3 batch_size 1 16
out past_key.0_RetainedState 2 4 batch_size 2 ctx_len 4
out past_value.0_RetainedState 4 4 batch_size 2 ctx_len 4
"""
SMALL_CACHE = {"past_key.0": ((2, 2, 8, 4), np.float16), "past_value.0": ((2, 2, 8, 4), np.float32)}
SMALL_LOGITS = (2, 1, 16)


@pytest.fixture
def small_qpc(tmp_path: Path) -> Path:
    path = tmp_path / "qpc" / "programqpc.bin"
    path.parent.mkdir()
    path.write_text(SMALL_QPC)
    return path
