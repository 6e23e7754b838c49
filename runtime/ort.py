"""OrtSession: a Session on onnxruntime whose KV cache never leaves bound OrtValues.

The retained state lives in two sets of OrtValues per cache, allocated once: each call binds
one set as the ``past_*`` inputs and the other as the retained-state outputs, then the two
swap. onnxruntime writes the new cache straight into the bound output buffer, so no call copies
the cache to NumPy or allocates a new one (``kv_bytes_copied`` counts the bytes that did cross,
which only ``state()`` and passing ``past_*`` arrays cause). CUDA is used when onnxruntime has it
and the model is not pinned to the CPU.
"""

from __future__ import annotations

__all__ = ["OrtSession"]

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qeff.common.onnxrt import onnxruntime_session
from qeff.contract import CTX_LEN, FULL_BATCH_SIZE, INPUT_IDS, LOGITS, read_manifest
from qeff.errors import QeffError
from qeff.runtime.session import Session, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _specs(args: Sequence[Any]) -> list[TensorSpec]:
    specs = []
    for a in args:
        if a.type not in _ORT_TYPES:
            raise QeffError(f"{a.name} has type {a.type}, which the session does not handle")
        specs.append(TensorSpec(a.name, np.dtype(_ORT_TYPES[a.type]),
                                tuple(d if isinstance(d, (int, str)) else None for d in a.shape)))
    return specs


_MAX_SIZE = 2**31 - 1  # beyond this no cache dim is allocatable, and the compilers take int32 sizes


def _size_option(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise QeffError(f"{name}={value!r} is not a whole number", f"e.g. {name}=128")
    if not 1 <= value <= _MAX_SIZE:
        raise QeffError(f"{name}={int(value)} is out of range", f"give {name} between 1 and {_MAX_SIZE}")
    return int(value)


def _embedding_rows(model: str | os.PathLike | bytes) -> int | None:
    """Rows of the initializer a ``Gather`` on ``input_ids`` reads (the token embedding), or
    None when the graph has no such table. Weights stored outside the file are not read."""
    import onnx

    try:
        proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                 else onnx.load(os.fspath(model), load_external_data=False))
    except Exception:  # the session loaded it already; a lookup that fails only loses the check
        return None
    tables = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == INPUT_IDS and axis == 0:
            dims = tables.get(node.input[0])
            if dims and dims[0] > 0:
                return int(dims[0])
    return None


class OrtSession(Session):
    """``OrtSession(model, ctx_len=None, full_batch_size=None, providers=None, prepack=False)``.

    ``model`` is a path or serialized bytes (e.g. an fp16 simulation). ``ctx_len`` and
    ``full_batch_size`` size the cache when the model leaves them symbolic (the manifest beside
    a model file supplies them when present).

    The weights of a model file are memory-mapped by onnxruntime from the external-data file
    and, with ``prepack`` False (the default), used in place: one copy of the weights, in the
    page cache, shared by every session on the model, and faster decode steps (a one-row MatMul
    gains nothing from packed weights). ``prepack=True`` copies each MatMul weight into
    onnxruntime's packed layout, which speeds up long prefills at the cost of a private copy
    of every weight.
    """

    def __init__(self, model: str | os.PathLike | bytes, *, ctx_len: int | None = None,
                 full_batch_size: int | None = None, providers: Sequence[str] | None = None,
                 prepack: bool = False) -> None:
        import onnxruntime as ort

        # Checked before the model loads: a bad size would otherwise surface only at the first
        # run, as an allocation failure or an onnxruntime error.
        ctx_len = _size_option(ctx_len, "ctx_len")
        full_batch_size = _size_option(full_batch_size, "full_batch_size")
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self._session = onnxruntime_session(model if isinstance(model, bytes) else os.fspath(model), list(providers),
                                            purpose=" for OrtSession", prepack=prepack)
        self.inputs = _specs(self._session.get_inputs())
        self.outputs = _specs(self._session.get_outputs())
        self.specializations = []
        self.device = "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        try:
            manifest = None if isinstance(model, bytes) else read_manifest(model)
        except ValueError as e:
            raise QeffError(f"the manifest beside the model is not valid: {e}",
                            "re-run qeff-opt to write it again, or delete it") from None
        # The vocabulary, when the logits leave it symbolic, is looked up in the model on first
        # use (False: not yet); serialized bytes are read now rather than kept alive.
        self._source = None if isinstance(model, bytes) else model
        self._vocab_size: int | None | bool = False
        if isinstance(model, bytes) and super().vocab_size is None and LOGITS in self.output_names:
            self._vocab_size = _embedding_rows(model)
        self.ctx_len = ctx_len if ctx_len is not None else (manifest.ctx_len if manifest else None)
        self.full_batch_size = full_batch_size if full_batch_size is not None else (
            manifest.full_batch_size if manifest else None)
        self.ccl = manifest.ccl if manifest else None  # compute context lengths, when ccl rewrote the model
        self._state: dict[str, Any] = {}  # past input -> OrtValue read by the next call
        self._spare: dict[str, Any] = {}  # past input -> OrtValue the next call writes
        self._rows: int | None = None
        self.kv_bytes_copied = 0
        self._closed = False

    @property
    def vocab_size(self) -> int | None:
        """The static last dim of ``logits``; when the model leaves it symbolic, the rows of
        the embedding table ``input_ids`` indexes (looked up once, on first use)."""
        size = super().vocab_size
        if size is not None:
            return size
        if self._vocab_size is False:
            self._vocab_size = _embedding_rows(self._source) if self._source is not None else None
        return self._vocab_size

    # -- state ------------------------------------------------------------------------------

    def _cache_shape(self, name: str, rows: int) -> tuple[int, ...]:
        sizes = {CTX_LEN: self.ctx_len, FULL_BATCH_SIZE: self.full_batch_size}
        shape = []
        for i, dim in enumerate(self.spec(name).shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif i == 0:
                shape.append(self.full_batch_size or rows)
            elif isinstance(dim, str) and sizes.get(dim):
                shape.append(sizes[dim])
            else:
                raise QeffError(f"the size of {name}'s dim {dim!r} is not known",
                                "pass ctx_len= (and full_batch_size= for continuous batching) to OrtSession")
        return tuple(shape)

    def _allocate(self, rows: int) -> None:
        import onnxruntime as ort

        self._state, self._spare = {}, {}
        for name in self.retained:
            spec = self.spec(name)
            zeros = np.zeros(self._cache_shape(name, rows), spec.dtype)
            for store in (self._state, self._spare):
                # onnxruntime owns this memory (ortvalue_from_numpy would borrow the array's).
                store[name] = ort.OrtValue.ortvalue_from_shape_and_type(zeros.shape, zeros.dtype, self.device, 0)
                store[name].update_inplace(zeros)
        self._rows = rows

    def reset(self) -> None:
        self._check_open()
        for value in self._state.values():
            value.update_inplace(np.zeros(value.shape(), value.numpy().dtype))

    def state(self) -> dict[str, np.ndarray]:
        self._check_open()
        copies = {name: np.array(value.numpy(), copy=True) for name, value in self._state.items()}
        self.kv_bytes_copied += sum(a.nbytes for a in copies.values())
        return copies

    # -- run --------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        self._check_feeds(feeds)
        for name, array in feeds.items():
            self.spec(name).check(np.asarray(array))
        rows = next(iter(feeds.values())).shape[0] if feeds else 1
        if self.retained and (self._rows is None or (not self.full_batch_size and rows != self._rows)):
            self._allocate(rows)
        binding = self._session.io_binding()
        for name, array in feeds.items():
            if name in self.retained:  # replaces the state (copied into the bound buffer)
                state = self._state[name]
                if tuple(array.shape) != tuple(state.shape()):
                    raise QeffError(f"{name} has shape {tuple(array.shape)}, the cache is {tuple(state.shape())}",
                                    "pass an array from state() of a session with the same batch")
                state.update_inplace(np.ascontiguousarray(array))
                self.kv_bytes_copied += array.nbytes
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in self._state.items():
            binding.bind_ortvalue_input(name, value)
        for name, output in self.retained.items():
            binding.bind_ortvalue_output(output, self._spare[name])
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        try:
            self._session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises its own exception types
            raise QeffError(f"onnxruntime failed: {str(e).strip().splitlines()[-1]}",
                            "check the input shapes against the model's") from None
        self._state, self._spare = self._spare, self._state
        produced = binding.get_outputs()
        bound = [o.name for o in self._session.get_outputs() if o.name in set(self.output_names)]
        # get_outputs follows the binding order: the retained outputs first, then the others.
        results = produced[len(self.retained):]
        return {name: value.numpy() for name, value in zip(bound, results)}

    def close(self) -> None:
        self._state, self._spare, self._session, self._closed = {}, {}, None, True

    def _check_open(self) -> None:
        if self._closed:
            raise QeffError("the session is closed", "create a new OrtSession")

