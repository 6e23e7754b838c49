"""qeff.runtime._qaicrt, the C binding to libQAic.so, against the stand-in library (tests/runtime/standin_qaic.c).

These tests use a hand-written stand-in QPC (aic_helpers.SMALL_QPC): no ONNX model, no torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from qeff.runtime import _qaicrt
from tests.runtime.aic_helpers import SMALL_CACHE, SMALL_LOGITS, counter, expected_step, small_qpc, standin_lib

__all__ = ["small_qpc", "standin_lib"]  # fixtures, imported for pytest

OPEN_CALLS = ["qaicCreateContext", "qaicCreateQueue", "qaicOpenQpcFile", "qaicProgramPropertiesInitDefault",
              "qaicCreateProgram", "qaicLoadProgram", "qaicRunActivationCmd", "qaicProgramGetIoDescriptor",
              "qaicCreateExecObj"]
RUN_CALLS = ["qaicExecObjSetDataExt", "qaicEnqueueExecObj", "qaicExecObjWaitForCompletion"]


@pytest.fixture(autouse=True)
def _no_injected_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QAIC_STANDIN_FAIL", "QAIC_STANDIN_DEVICES", "QAIC_STANDIN_SLEEP_MS", "QAIC_STANDIN_RELEASE_SLEEP_MS",
                 "QAIC_LIB"):
        monkeypatch.delenv(name, raising=False)


def tokens(seq: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and position_ids for batch 2: row 1 has different ids and one pad (-1) in a prefill."""
    ids = np.stack([np.arange(seq) + 10 + start, np.arange(seq) + 100 + start]).astype(np.int64)
    pos = np.stack([np.arange(seq) + start, np.arange(seq) + start]).astype(np.int64)
    if seq > 1:
        pos[1, -1] = -1
    return ids, pos


def zero_cache() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in SMALL_CACHE.items()}


# ---- loading -----------------------------------------------------------------------------------


def test_qaicrt_imports_and_lists_its_calls_without_the_sdk() -> None:
    for call in ("qaicCreateContext", "qaicCreateQueue", "qaicOpenQpcFile", "qaicCreateProgram", "qaicLoadProgram",
                 "qaicRunActivationCmd", "qaicCreateExecObj", "qaicExecObjSetDataExt", "qaicEnqueueExecObj",
                 "qaicExecObjWaitForCompletion", "qaicReleaseExecObj", "qaicUnloadProgram", "qaicReleaseProgram",
                 "qaicCloseQpc", "qaicReleaseQueue", "qaicReleaseContext"):
        assert call in _qaicrt.CALLS
    assert _qaicrt.DEFAULT_LIBRARY == "/opt/qti-aic/dev/lib/x86_64/libQAic.so"
    assert issubclass(_qaicrt.StatusError, _qaicrt.Error) and issubclass(_qaicrt.LibraryError, _qaicrt.Error)


def test_qaicrt_missing_library_names_the_path_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(_qaicrt.LibraryError, match=r"tried .*nowhere\.so \(from the lib argument\)"):
        _qaicrt.Library(str(tmp_path / "nowhere.so"))
    monkeypatch.setenv("QAIC_LIB", str(tmp_path / "env.so"))
    with pytest.raises(_qaicrt.LibraryError, match=r"tried .*env\.so \(from \$QAIC_LIB\)"):
        _qaicrt.Library()
    monkeypatch.delenv("QAIC_LIB")
    if not Path(_qaicrt.DEFAULT_LIBRARY).exists():
        with pytest.raises(_qaicrt.LibraryError, match=r"tried /opt/qti-aic/dev/lib/x86_64/libQAic\.so"):
            _qaicrt.Library()


def test_qaicrt_library_without_the_calls_is_refused() -> None:
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no libc to load")
    with pytest.raises(_qaicrt.LibraryError, match="has no qaicCreateContext"):
        _qaicrt.Library(libc)


def test_qaicrt_library_from_env(monkeypatch: pytest.MonkeyPatch, standin_lib: Path) -> None:
    monkeypatch.setenv("QAIC_LIB", str(standin_lib))
    assert _qaicrt.Library().path == str(standin_lib)


# ---- lifecycle ---------------------------------------------------------------------------------


def test_qaicrt_lifecycle_open_run_close(standin_lib: Path, small_qpc: Path) -> None:
    live = counter(standin_lib, "live")
    session = _qaicrt.Library(standin_lib).open(small_qpc)
    assert counter(standin_lib, "live") == live + 5  # context, queue, QPC, program, exec object
    assert not session.closed and session.device_id == 0 and session.qpc_path == str(small_qpc)
    assert session.io_descriptor == small_qpc.read_bytes()
    ids, pos = tokens(4)
    logits = np.empty(SMALL_LOGITS, np.float32)
    session.run([ids, pos, None, None], [logits, None, None])
    session.close()
    assert session.closed and counter(standin_lib, "live") == live
    session.close()  # a second close does nothing
    with pytest.raises(_qaicrt.Error, match="closed"):
        session.run([ids, pos, None, None], [logits, None, None])
    with pytest.raises(_qaicrt.Error, match="closed"):
        session.io_descriptor  # noqa: B018


def test_qaicrt_unclosed_session_is_released_when_collected(standin_lib: Path, small_qpc: Path) -> None:
    live = counter(standin_lib, "live")
    session = _qaicrt.Library(standin_lib).open(small_qpc)
    del session
    gc.collect()
    assert counter(standin_lib, "live") == live


def test_qaicrt_missing_qpc_and_bad_device(standin_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = _qaicrt.Library(standin_lib)
    live = counter(standin_lib, "live")
    with pytest.raises(_qaicrt.StatusError, match=r"qaicOpenQpcFile failed with status 6 \(QS_INVAL\)") as info:
        library.open(tmp_path / "missing" / "programqpc.bin")
    assert (info.value.call, info.value.status) == ("qaicOpenQpcFile", 6)
    assert counter(standin_lib, "live") == live  # the context and queue made before it were released
    with pytest.raises(_qaicrt.StatusError, match=r"qaicCreateContext failed with status 5 \(QS_NODEV\)"):
        library.open(tmp_path / "any.bin", device_id=3)
    with pytest.raises(ValueError, match="device_id"):
        library.open(tmp_path / "any.bin", device_id=-1)
    with pytest.raises(TypeError):
        library.open(None)


# ---- marshalling and retained state ------------------------------------------------------------


def test_qaicrt_outputs_match_numpy_and_state_stays_on_the_device(standin_lib: Path, small_qpc: Path) -> None:
    """Zero-size past buffers keep the state on the (stand-in) device across runs; the outputs
    equal the stand-in's program computed independently in NumPy."""
    expected = zero_cache()
    with _open(standin_lib, small_qpc) as session:
        for seq, start in ((4, 0), (1, 4), (1, 5)):
            ids, pos = tokens(seq, start)
            logits = np.full(SMALL_LOGITS, np.nan, np.float32)
            session.run([ids, pos, None, None], [logits, None, None])
            expected, want = expected_step(expected, ids, pos, SMALL_LOGITS)
            np.testing.assert_array_equal(logits, want)
            assert counter(standin_lib, "retained_bytes_in") == counter(standin_lib, "retained_bytes_out") == 0
        # Reading the state back: full-size _RetainedState buffers receive a copy.
        ids, pos = tokens(1, 6)
        outs = [np.empty(SMALL_LOGITS, np.float32)] + [np.empty(s, d) for s, d in SMALL_CACHE.values()]
        session.run([ids, pos, None, None], outs)
        expected, want = expected_step(expected, ids, pos, SMALL_LOGITS)
        np.testing.assert_array_equal(outs[0], want)
        for got, name in zip(outs[1:], SMALL_CACHE):
            np.testing.assert_array_equal(got, expected[name])


def test_qaicrt_passing_past_replaces_the_state(standin_lib: Path, small_qpc: Path) -> None:
    rng = np.random.default_rng(0)
    given = {name: rng.integers(0, 50, shape).astype(dtype) for name, (shape, dtype) in SMALL_CACHE.items()}
    with _open(standin_lib, small_qpc) as session:
        session.run([*tokens(4), None, None], [np.empty(SMALL_LOGITS, np.float32), None, None])
        ids, pos = tokens(1, 4)
        logits = np.empty(SMALL_LOGITS, np.float32)
        session.run([ids, pos, *given.values()], [logits, None, None])
        assert counter(standin_lib, "retained_bytes_in") == sum(a.nbytes for a in given.values())
        np.testing.assert_array_equal(logits, expected_step(given, ids, pos, SMALL_LOGITS)[1])


# ---- bad input: always an exception, never a crash -------------------------------------------------


def test_qaicrt_bad_buffers_raise(standin_lib: Path, small_qpc: Path) -> None:
    ids, pos = tokens(4)
    logits = np.empty(SMALL_LOGITS, np.float32)
    with _open(standin_lib, small_qpc) as session:
        with pytest.raises(_qaicrt.StatusError, match="qaicExecObjSetDataExt failed with status 6") as info:
            session.run([ids, pos], [logits])  # too few buffers
        assert info.value.call == "qaicExecObjSetDataExt"
        with pytest.raises(_qaicrt.StatusError, match="qaicExecObjSetDataExt"):
            session.run([ids.astype(np.int32), pos, None, None], [logits, None, None])  # wrong element size
        with pytest.raises(_qaicrt.StatusError, match="qaicExecObjSetDataExt"):
            session.run([ids, pos, None, None], [None, None, None])  # zero size for a non-retained output
        with pytest.raises(_qaicrt.StatusError, match=r"qaicExecObjWaitForCompletion failed with status 300"):
            session.run([*tokens(3), None, None], [logits, None, None])  # seq 3: no compiled specialization
        with pytest.raises(TypeError, match="input 0 must be a C-contiguous buffer"):
            session.run([np.zeros((4, 2), np.int64).T, pos, None, None], [logits, None, None])
        with pytest.raises(TypeError, match="output 0 must be a writable"):
            session.run([ids, pos, None, None], [bytes(logits.nbytes), None, None])
        with pytest.raises(TypeError, match="input 2 must be"):
            session.run([ids, pos, 42, None], [logits, None, None])
        with pytest.raises(TypeError, match="inputs must be a sequence"):
            session.run(42, [logits])
        with pytest.raises(ValueError, match="timeout"):
            session.run([ids, pos, None, None], [logits, None, None], timeout=-1)
        with pytest.raises(TypeError):
            session.run([ids, pos, None, None])
        # The session is still good after all of that.
        session.run([ids, pos, None, None], [logits, None, None])


def deep_buffer(ndim: int) -> ctypes.Array:
    """A float32 buffer of ``ndim`` dims of 1: nested ctypes arrays export one dim per level,
    with no limit of their own (NumPy and memoryview stop at 64, PyBUF_MAX_NDIM)."""
    kind = ctypes.c_float
    for _ in range(ndim):
        kind = kind * 1
    return kind()


def test_qaicrt_buffer_with_too_many_dims_raises(standin_lib: Path, small_qpc: Path) -> None:
    """QBufferDimensions holds at most PyBUF_MAX_NDIM dims per buffer: more is refused before any
    is stored (the last buffer's dims end the array they live in)."""
    deep = deep_buffer(65)
    assert memoryview(deep_buffer(64)).ndim == 64
    ids, pos = tokens(4)
    logits = np.empty(SMALL_LOGITS, np.float32)
    with _open(standin_lib, small_qpc) as session:
        runs = counter(standin_lib, "runs")
        with pytest.raises(ValueError, match="output 2 has 65 dimensions, more than the 64"):
            session.run([ids, pos, None, None], [logits, None, deep])
        with pytest.raises(ValueError, match="input 0 has 65 dimensions"):
            session.run([deep, pos, None, None], [logits, None, None])
        assert counter(standin_lib, "runs") == runs
        session.run([ids, pos, None, None], [logits, None, None])  # still good


@pytest.mark.parametrize("call", OPEN_CALLS)
def test_qaicrt_failing_open_call_releases_what_it_made(call: str, standin_lib: Path, small_qpc: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    library = _qaicrt.Library(standin_lib)
    live = counter(standin_lib, "live")
    monkeypatch.setenv("QAIC_STANDIN_FAIL", f"{call}=9")
    with pytest.raises(_qaicrt.StatusError, match=rf"{call} failed with status 9 \(QS_TIMEDOUT\) while opening") as info:
        library.open(small_qpc)
    assert (info.value.call, info.value.status) == (call, 9)
    assert counter(standin_lib, "live") == live


@pytest.mark.parametrize("call", RUN_CALLS)
def test_qaicrt_failing_run_call_raises_and_the_session_recovers(call: str, standin_lib: Path, small_qpc: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ids, pos = tokens(4)
    logits = np.empty(SMALL_LOGITS, np.float32)
    with _open(standin_lib, small_qpc) as session:
        monkeypatch.setenv("QAIC_STANDIN_FAIL", call)
        with pytest.raises(_qaicrt.StatusError, match=rf"{call} failed with status 500 \(QS_ERROR\)"):
            session.run([ids, pos, None, None], [logits, None, None])
        monkeypatch.delenv("QAIC_STANDIN_FAIL")
        session.run([ids, pos, None, None], [logits, None, None])


def test_qaicrt_failing_release_still_closes(standin_lib: Path, small_qpc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _qaicrt.Library(standin_lib).open(small_qpc)
    monkeypatch.setenv("QAIC_STANDIN_FAIL", "qaicUnloadProgram=4")
    with pytest.raises(_qaicrt.StatusError, match=r"qaicUnloadProgram failed with status 4 \(QS_BUSY\) while closing"):
        session.close()
    assert session.closed
    session.close()


def test_qaicrt_run_releases_the_gil_and_close_waits_its_turn(standin_lib: Path, small_qpc: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_STANDIN_SLEEP_MS", "300")
    ids, pos = tokens(4)
    logits = np.empty(SMALL_LOGITS, np.float32)
    with _open(standin_lib, small_qpc) as session:
        worker = threading.Thread(target=session.run, args=([ids, pos, None, None], [logits, None, None]))
        start = time.perf_counter()
        worker.start()
        time.sleep(0.05)
        with pytest.raises(_qaicrt.Error, match="busy"):
            session.close()
        ticks = 0
        while worker.is_alive():  # this thread keeps running while the device "works"
            ticks += 1
            time.sleep(0.01)
        worker.join()
        assert time.perf_counter() - start >= 0.3 and ticks > 5


def test_qaicrt_collecting_an_unclosed_session_releases_the_gil(standin_lib: Path, small_qpc: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The deallocator's release calls can block on the device: other threads keep running meanwhile."""
    live = counter(standin_lib, "live")
    session = _qaicrt.Library(standin_lib).open(small_qpc)
    monkeypatch.setenv("QAIC_STANDIN_RELEASE_SLEEP_MS", "300")
    ticks, stop = [], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    worker = threading.Thread(target=tick)
    worker.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        del session  # the last reference: Session_dealloc releases the device
        end = time.perf_counter()
    finally:
        stop.set()
        worker.join()
    assert end - start >= 0.3
    assert sum(start < t < end for t in ticks) > 5
    assert counter(standin_lib, "live") == live


class _open:
    """A session as a context manager (the extension's Session has no __enter__ of its own)."""

    def __init__(self, library: Path, qpc: Path) -> None:
        self.session = _qaicrt.Library(library).open(qpc)

    def __enter__(self):  # noqa: ANN204
        return self.session

    def __exit__(self, *exc: object) -> None:
        self.session.close()


# ---- valgrind ----------------------------------------------------------------------------------

VALGRIND_SCRIPT = textwrap.dedent('''
    """Every path of the binding, with memoryviews instead of NumPy (a light process under valgrind)."""
    import ctypes, gc, importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("qeff.runtime._qaicrt", sys.argv[1])
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    standin, qpc = sys.argv[2], sys.argv[3]

    def buffer(fmt, shape):
        """A zeroed C-contiguous buffer; "H" (uint16) stands for float16, which memoryview lacks."""
        size = {"q": 8, "f": 4, "H": 2}[fmt]
        for d in shape:
            size *= d
        return memoryview(bytearray(size)).cast(fmt, shape)

    def expect(error, call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except error as e:
            str(e)
            return
        raise SystemExit(f"{call} did not raise {error}")

    expect(q.LibraryError, q.Library, "/nonexistent/libQAic.so")
    expect(q.LibraryError, q.Library, "libc.so.6")
    lib = q.Library(standin)
    repr(lib)
    expect(q.StatusError, lib.open, "/nonexistent/programqpc.bin")
    expect(q.StatusError, lib.open, qpc, device_id=7)
    for call in q.CALLS[:9]:
        os.environ["QAIC_STANDIN_FAIL"] = call
        expect(q.StatusError, lib.open, qpc)
    del os.environ["QAIC_STANDIN_FAIL"]

    s = lib.open(qpc)
    repr(s), s.io_descriptor, s.qpc_path, s.device_id
    ids, pos = buffer("q", [2, 4]), buffer("q", [2, 4])
    ids1, pos1 = buffer("q", [2, 1]), buffer("q", [2, 1])
    for i in range(8):
        ids[0, i % 4] = i
    logits = buffer("f", [2, 1, 16])
    keys, values = buffer("H", [2, 2, 8, 4]), buffer("f", [2, 2, 8, 4])
    s.run([ids, pos, None, None], [logits, None, None])
    s.run([ids1, pos1, None, None], [logits, None, None])
    s.run([ids1, pos1, keys, values], [logits, keys, values])
    expect(q.StatusError, s.run, [ids, pos], [logits])
    expect(q.StatusError, s.run, [ids1, pos, None, None], [logits, None, None])
    expect(q.StatusError, s.run, [ids, pos, None, None], [None, None, None])
    expect(TypeError, s.run, [memoryview(bytearray(128)).cast("q")[::2], pos, None, None], [logits, None, None])
    expect(TypeError, s.run, [ids, pos, None, None], [bytes(128), None, None])
    expect(TypeError, s.run, [ids, pos, 1.5, None], [logits, None, None])
    expect(TypeError, s.run, 3, [])
    expect(TypeError, s.run, [ids], 3)
    expect(ValueError, s.run, [ids, pos, None, None], [logits, None, None], timeout=2**40)
    for call in q.CALLS[9:12]:
        os.environ["QAIC_STANDIN_FAIL"] = call
        expect(q.StatusError, s.run, [ids, pos, None, None], [logits, None, None])
    del os.environ["QAIC_STANDIN_FAIL"]
    s.run((x for x in [ids, pos, None, None]), [logits, None, None])
    s.close()
    s.close()
    expect(q.Error, s.run, [ids, pos, None, None], [logits, None, None])
    expect(q.Error, lambda: s.io_descriptor)

    os.environ["QAIC_STANDIN_FAIL"] = "qaicReleaseProgram"
    s = lib.open(qpc)
    expect(q.StatusError, s.close)
    del os.environ["QAIC_STANDIN_FAIL"]
    s = lib.open(qpc)
    deep = ctypes.c_float
    for _ in range(65):
        deep = deep * 1
    expect(ValueError, s.run, [ids, pos, None, None], [logits, None, deep()])
    s.run([ids, pos, None, None], [logits, None, None])
    del s  # released by the deallocator
    gc.collect()
    print("VALGRIND-SCRIPT-OK")
''')


def _our_errors(xml_file: Path, ours: tuple[str, ...]) -> tuple[int, list[str]]:
    """(all errors, descriptions of the errors that count) from valgrind's XML output.

    Counted: every error that is not an uninitialised-value report (invalid reads, writes, frees,
    ...: a refcount bug in the binding shows up inside CPython's frames, so these count wherever
    they are), and every error with a frame in the binding or the stand-in. Leak records are
    ignored (the run uses --leak-check=no).
    """
    root = ET.parse(xml_file).getroot()
    total, counted = 0, []
    for error in root.iter("error"):
        kind = error.findtext("kind") or ""
        if kind.startswith("Leak_"):
            continue
        total += 1
        frames = [(f.findtext("fn") or "?", f.findtext("obj") or "?") for f in error.iter("frame")]
        mine = any(any(name in obj for name in ours) for _, obj in frames)
        if mine or not kind.startswith("Uninit"):
            counted.append(f"{kind}: {error.findtext('what') or ''} at " + " < ".join(fn for fn, _ in frames[:8]))
    return total, counted


def test_qaicrt_under_valgrind_reports_no_errors(standin_lib: Path, small_qpc: Path, tmp_path: Path) -> None:
    """The binding's every path (loading, opening, runs, bad buffers, failing calls, close, double
    close, use after close, collection) under ``valgrind --error-exitcode=99 --leak-check=no`` with
    ``PYTHONMALLOC=malloc``.

    CPython 3.11 itself is noisy under valgrind: ``python -c pass`` already reports hundreds of
    "uninitialised value" errors from its own frames (longobject.c, ceval.c), so "ERROR SUMMARY:
    0 errors" cannot hold for the whole process and the exit code is 99 whenever that noise is
    there. What counts is read from valgrind's XML output instead (see ``_our_errors``): any
    invalid read/write/free anywhere, and any error whose stack passes through ``_qaicrt`` or the
    stand-in ``libQAic.so``. That count must be 0.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    script = tmp_path / "exercise.py"
    script.write_text(VALGRIND_SCRIPT)
    xml_file = tmp_path / "valgrind.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAIC_")} | {"PYTHONMALLOC": "malloc"}
    command = [valgrind, "--error-exitcode=99", "--leak-check=no", "--xml=yes", f"--xml-file={xml_file}",
               sys.executable, str(script), _qaicrt.__file__, str(standin_lib), str(small_qpc)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert "VALGRIND-SCRIPT-OK" in result.stdout, result.stdout + result.stderr
    assert result.returncode in (0, 99), result.stderr
    total, counted = _our_errors(xml_file, (Path(_qaicrt.__file__).name, standin_lib.name))
    assert not counted, f"{len(counted)} of {total} valgrind errors involve the binding:\n" + "\n".join(counted)
    assert total == 0 or result.returncode == 99  # the exit code agrees with what was parsed
