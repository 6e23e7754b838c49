"""AicSession: a :class:`~qeff.runtime.session.Session` on the Cloud AI 100 runtime (DESIGN §5).

It opens a compile folder written by ``qeff compile`` (``qeff.backend_aic.compile_model``):

- the QPC ``<folder>/qpc/programqpc.bin`` is loaded through the C extension
  :mod:`qeff.runtime._qaicrt`, which dlopens ``libQAic.so`` at first use (the ``lib`` argument,
  else ``$QAIC_LIB``, else the Platform SDK's default path);
- the input and output specs come from the ONNX model named by ``-m=`` in ``qeff-compile.json``
  (read with ``onnx_ir``, without weights); the precision of the retained state comes from
  ``custom_io.yaml`` (the card keeps the KV cache as ``float16`` when the compile said so, and that
  is the dtype to pass or read back);
- the allowed shapes come from ``specializations.json`` (flat or named form).

ASSUMPTION, standing in for the runtime's I/O descriptor: the program's buffers are bound in the
order *model inputs, then model outputs, each in graph order*. That is the order the compiler is
given them in, but the authoritative binding order is the QPC's I/O descriptor
(``_qaicrt.Session.io_descriptor``, an ``aicapi.IoDesc`` protobuf); check it against a real QPC.

Retained state: ordinary runs pass zero-size ``past_*`` buffers and zero-size
retained-state buffers, so the KV cache never crosses PCIe. Passing a ``past_*`` array
uploads it (replacing the state); ``reset()`` uploads zeros on the next run. The card's state is
not readable without a run, so ``state()`` needs ``mirror_state=True``, which has each run copy the
updated state back (a debugging aid that costs one full copy per run).
"""

from __future__ import annotations

__all__ = ["AicSession", "AicRuntimeError", "AicLibraryError"]

import contextlib
import json
import operator
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qeff.contract import CUSTOM_IO_NAME, PARAMS_NAME, QPC_DIR, QPC_MARKER, SPECIALIZATIONS_NAME
from qeff.errors import QeffError
from qeff.runtime import _qaicrt
from qeff.runtime.session import Session, TensorSpec

# The compile folder's layout, as backend_aic writes it.
QPC_NAME = QPC_MARKER.name

_QID_MAX = 2**31 - 1

#: custom_io.yaml precisions the host can read and write, as NumPy dtypes.
_HOST_PRECISIONS = {"float16": np.float16, "float32": np.float32, "float": np.float32}


class AicRuntimeError(QeffError):
    """A Cloud AI runtime call failed, or the session cannot run (closed, busy)."""


class AicLibraryError(QeffError):
    """The Cloud AI runtime library (libQAic.so) cannot be loaded."""


class AicSession(Session):
    """A compiled model loaded and activated on one Cloud AI device.

    ``path`` is a compile folder, its ``qpc/`` folder or its ``programqpc.bin``; ``lib`` the
    path of ``libQAic.so`` (default ``$QAIC_LIB``, else the SDK's). See the module docstring for
    how inputs, outputs and the retained state are bound.
    """

    def __init__(self, path: str | os.PathLike[str], *, device_id: int = 0, lib: str | os.PathLike[str] | None = None,
                 mirror_state: bool = False) -> None:
        self._native: Any = None  # set last: close() and repr() work after a failed __init__
        device_id = _device_id(device_id)
        folder, qpc = _locate(Path(path))
        self.folder, self.qpc = folder, qpc
        precisions = _custom_io(folder)
        self.inputs, self.outputs = _read_specs(_model_path(folder), precisions)
        self.specializations = _read_specializations(folder)
        # Retained state the host cannot hold (e.g. an mxint8 cache): it stays on the card, always.
        self._device_only = {n: p for n, p in precisions.items() if p not in _HOST_PRECISIONS}
        _check_outputs_sizable(self.inputs, self.outputs, self.specializations)
        if mirror_state and any(n in self._device_only for n in self.retained):
            raise QeffError("mirror_state needs a KV cache the host can read, this one is kept as "
                            f"{sorted(set(self._device_only.values()))}", "compile with a float16 KV cache")
        self._pending_reset: set[str] = set()
        self._sizes: dict[str, int] = {}  # the symbol sizes of the last run
        self._mirror: dict[str, np.ndarray] | None = {} if mirror_state else None
        with _runtime_errors("opening " + str(qpc)):
            library = _qaicrt.Library(None if lib is None else os.fspath(lib))
            self._native = library.open(str(qpc), device_id)

    # ---- Session API --------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_open()
        self._check_feeds(feeds)
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        for name, array in arrays.items():
            self.spec(name).check(array)
        sizes = self._choose_sizes(arrays)
        self._sizes = sizes
        for name, array in arrays.items():
            self.spec(name).check(array, sizes)
        inputs = [self._input_buffer(spec, arrays, sizes) for spec in self.inputs]
        outputs = [self._output_buffer(spec, sizes) for spec in self.outputs]
        with _runtime_errors("running"):
            self._native.run(inputs, outputs)
        self._pending_reset.clear()
        results = dict(zip((o.name for o in self.outputs), outputs))
        if self._mirror is not None:
            self._mirror = {past: results[kept] for past, kept in self.retained.items()}
        return {name: results[name] for name in self.output_names}

    def reset(self) -> None:
        """Zero the retained state: the next run uploads zeros for every ``past_*`` not given."""
        self._require_open()
        held = sorted(n for n in self.retained if n in self._device_only)
        if held:
            raise QeffError(f"the card keeps {held[0]} as {self._device_only[held[0]]}, which the host cannot write",
                            "compile with a float16 KV cache to reset it, or overwrite it by position")
        self._pending_reset = set(self.retained)

    def state(self) -> dict[str, np.ndarray]:
        """The retained state after the last run (or zeros after ``reset``); needs ``mirror_state=True``."""
        self._require_open()
        if self._mirror is None:
            raise QeffError("the retained state lives on the card and this session does not copy it back",
                            "open it with AicSession(..., mirror_state=True) to read it (one copy per run)")
        state = {}
        for name in self.retained:
            if name in self._pending_reset:
                state[name] = np.zeros(self._resolved_shape(self.spec(name), self._last_sizes()), self.spec(name).dtype)
            elif name in self._mirror:
                state[name] = self._mirror[name].copy()
            else:
                raise QeffError(f"the state of {name} has not been read back yet", "run once first, or reset()")
        return state

    def close(self) -> None:
        """Release the program and the device; closing twice does nothing."""
        native, self._native = self._native, None
        if native is not None:
            with _runtime_errors("closing"):
                native.close()

    def __repr__(self) -> str:
        state = "closed" if self._native is None else f"device {self._native.device_id}"
        return f"AicSession({str(self.qpc)!r}, {state})"

    @property
    def io_descriptor(self) -> bytes:
        """The QPC's serialised I/O descriptor (an aicapi.IoDesc protobuf), for checking the binding order."""
        self._require_open()
        with _runtime_errors("reading the I/O descriptor"):
            return self._native.io_descriptor

    # ---- binding ------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._native is None:
            raise AicRuntimeError("the session is closed", "open a new AicSession")

    def _choose_sizes(self, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Symbol sizes from the arrays, matched against the compiled specializations."""
        bound: dict[str, int] = {}
        where: dict[str, str] = {}
        for name, array in arrays.items():
            for dim, size in zip(self.spec(name).shape, array.shape):
                if not isinstance(dim, str):
                    continue
                if dim in bound and bound[dim] != size:
                    raise QeffError(f"input {name!r} has {dim}={size}, but {where[dim]!r} has {dim}={bound[dim]}",
                                    "give every input the same sizes")
                bound.setdefault(dim, size)
                where.setdefault(dim, name)
        if not self.specializations:
            return bound
        for spec in self.specializations:
            if all(spec.get(symbol, size) == size for symbol, size in bound.items()):
                return {**bound, **spec}
        given = ", ".join(f"{k}={v}" for k, v in sorted(bound.items()))
        allowed = "; ".join(", ".join(f"{k}={v}" for k, v in s.items()) for s in self.specializations)
        raise QeffError(f"the inputs ({given}) match none of the shapes the QPC was compiled for",
                        f"pad or split them to one of: {allowed}")

    def _last_sizes(self) -> dict[str, int]:
        return self._sizes or (self.specializations[0] if self.specializations else {})

    def _resolved_shape(self, spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
        shape = []
        for dim in spec.shape:
            size = dim if isinstance(dim, int) else sizes.get(dim) if isinstance(dim, str) else None
            if size is None:
                raise QeffError(f"cannot size {spec.name!r} {spec.shape}: {dim!r} is not known for this run",
                                "compile the model with a specializations.json that sets it")
            shape.append(size)
        return tuple(shape)

    def _input_buffer(self, spec: TensorSpec, arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> Any:
        """The array to upload, or None: a zero-size buffer, which keeps retained state on the card."""
        if spec.name in arrays:
            if spec.name in self._device_only:
                raise QeffError(f"the card keeps {spec.name} as {self._device_only[spec.name]}; the host cannot write it",
                                "leave it out of run(): it stays on the card")
            return np.ascontiguousarray(arrays[spec.name])
        if spec.name in self._pending_reset:
            return np.zeros(self._resolved_shape(spec, sizes), spec.dtype)
        return None

    def _output_buffer(self, spec: TensorSpec, sizes: Mapping[str, int]) -> np.ndarray | None:
        """A fresh array the runtime writes into, or None for retained state that stays on the card."""
        if spec.name in self.retained.values() and self._mirror is None:
            return None
        return np.empty(self._resolved_shape(spec, sizes), spec.dtype)


# ---- reading the compile folder ---------------------------------------------------------------


def _device_id(value: object) -> int:
    """``value`` as a device id (0..2**31-1, the runtime's QID is a signed 32-bit integer),
    checked before the folder is read or the runtime library loaded."""
    try:
        if isinstance(value, bool):
            raise TypeError
        device = operator.index(value)
    except TypeError:
        raise QeffError(f"device_id must be a whole number, got {value!r}",
                        "give the device's number as qaic-util -q lists it, e.g. device_id=0") from None
    if not 0 <= device <= _QID_MAX:
        raise QeffError(f"device_id must be between 0 and {_QID_MAX}, got {device}",
                        "give the device's number as qaic-util -q lists it, e.g. device_id=0")
    return device



def _locate(path: Path) -> tuple[Path, Path]:
    """(compile folder, programqpc.bin) for a compile folder, its qpc/ folder or the QPC file."""
    if path.name == QPC_NAME or path.is_file():
        qpc = path
    elif path.name == "qpc" and not (path / "qpc").is_dir():
        qpc = path / QPC_NAME
    else:
        qpc = path / QPC_DIR / QPC_NAME
    folder = qpc.parent.parent if qpc.parent.name == "qpc" else qpc.parent
    if not (folder / PARAMS_NAME).is_file():
        raise QeffError(f"{path} is not a compile folder: there is no {PARAMS_NAME} in {folder}",
                        "pass the folder `qeff compile` wrote (or its qpc/ folder)")
    if not qpc.is_file():
        raise QeffError(f"there is no QPC at {qpc}",
                        "compile the model first (`qeff compile` without --dry-run; a dry run writes no QPC)")
    return folder, qpc


def _model_path(folder: Path) -> Path:
    """The ONNX model the QPC was compiled from: the -m= argument of the recorded command."""
    try:
        command = json.loads((folder / PARAMS_NAME).read_text())["command"]
        model = next(Path(arg[3:]) for arg in command if arg.startswith("-m="))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise QeffError(f"{folder / PARAMS_NAME} does not name the model (-m=...) it compiled",
                        "compile the model again with `qeff compile`") from None
    if not model.is_file():
        raise QeffError(f"the model the QPC was compiled from, {model}, is gone",
                        "the session reads the input and output specs from it: restore it or compile again")
    return model


def _custom_io(folder: Path) -> dict[str, str]:
    """{I/O name: precision} from custom_io.yaml (the KV cache's precision on the card)."""
    try:
        text = (folder / CUSTOM_IO_NAME).read_text()
    except OSError:
        return {}
    return dict(re.findall(r"IOName:\s*(\S+)\s+Precision:\s*(\S+)", text))


def _read_specs(model: Path, precisions: Mapping[str, str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs and outputs, in graph order; custom_io precisions override the ONNX dtype."""
    import onnx_ir as ir

    try:
        graph = ir.load(str(model)).graph
    except Exception as e:  # onnx_ir raises several types for a bad file
        raise QeffError(f"cannot read the model {model}: {e}", "compile the model again with `qeff compile`") from None

    def spec(value: Any) -> TensorSpec:
        dtype = np.dtype(_HOST_PRECISIONS.get(precisions.get(value.name, ""), value.dtype.numpy()))
        dims = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        return TensorSpec(value.name, dtype, dims)

    return [spec(v) for v in graph.inputs], [spec(v) for v in graph.outputs]


def _read_specializations(folder: Path) -> list[dict[str, int]]:
    """The compiled shapes, from the flat form or the named form of specializations.json."""
    path = folder / SPECIALIZATIONS_NAME
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["specializations"]
        return [{k: int(v) for k, v in (e["symbols"] if "symbols" in e else e).items()} for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise QeffError(f"{path} is not a specializations file this session can read",
                        'it should be {"specializations": [{"batch_size": "1", ...}, ...]}') from None


def _check_outputs_sizable(inputs: list[TensorSpec], outputs: list[TensorSpec],
                           specializations: list[dict[str, int]]) -> None:
    """Every output dim must be a number or a symbol the inputs or the specializations fix."""
    known = {d for i in inputs for d in i.shape if isinstance(d, str)}
    known |= {k for s in specializations for k in s}
    for output in outputs:
        unsized = [d for d in output.shape if not isinstance(d, int) and d not in known]
        if unsized:
            raise QeffError(f"output {output.name!r} has a dim the session cannot size: {output.shape}",
                            "give it a name the inputs use, or fix it with the fixed pass before compiling")


@contextlib.contextmanager
def _runtime_errors(action: str) -> Iterator[None]:
    """The extension's exceptions as QeffErrors with a hint."""
    try:
        yield
    except _qaicrt.LibraryError as e:
        raise AicLibraryError(str(e), "install the Cloud AI Platform SDK, or point $QAIC_LIB (or lib=) at "
                                      "libQAic.so") from None
    except _qaicrt.StatusError as e:
        raise AicRuntimeError(f"{action}: {e}", _status_hint(getattr(e, "call", ""))) from None
    except _qaicrt.Error as e:
        raise AicRuntimeError(f"{action}: {e}") from None


def _status_hint(call: str) -> str:
    if call == "qaicCreateContext":
        return "check the device id and that the card is ready (qaic-util -q)"
    if call in ("qaicOpenQpcFile", "qaicCreateProgram"):
        return "the QPC may be damaged or built by another SDK version: compile it again"
    if call in ("qaicLoadProgram", "qaicRunActivationCmd"):
        return "the device may lack free cores or memory: close other programs (qaic-util -q shows them)"
    if call in ("qaicExecObjSetDataExt", "qaicExecObjWaitForCompletion"):
        return "the buffers may not match the QPC's bindings or any compiled specialization"
    return "check the device with qaic-util -q and the runtime's log"
