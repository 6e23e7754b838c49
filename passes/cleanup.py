"""cleanup: remove what the graph does not use and put the rest in a canonical order."""

from __future__ import annotations

__all__ = ["CleanupPass"]

import dataclasses
import hashlib
import logging
import os
from collections import defaultdict

import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from qeff.passes.infra.base import QeffPass, QeffPassResult

logger = logging.getLogger(__name__)

# Bytes read from each end of a tensor to tell candidates apart before any full comparison:
# random weights differ in their first bytes, so a multi-gigabyte model is deduplicated
# without reading it twice.
_PROBE_BYTES = 4096
_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class CleanupOptions:
    remove_unused_inputs: bool = dataclasses.field(
        default=True, metadata={"help": "drop graph inputs nothing reads"}
    )
    deduplicate: bool = dataclasses.field(
        default=True, metadata={"help": "merge initializers with identical dtype, shape and bytes"}
    )


class CleanupPass(QeffPass):
    """Remove dead code and duplicates; sort topologically.

    Rules:
    1. ``y = Identity(x)`` is removed and its uses read ``x`` (kept only where both are graph
       boundary values).
    2. Nodes none of whose outputs are used or are graph outputs are removed, repeatedly, in
       the main graph, subgraphs and functions; unused functions and opset imports go too.
    3. Initializers nothing reads are removed (never a graph input or output).
    4. Graph inputs nothing reads are removed (``remove_unused_inputs``).
    5. Initializers with the same dtype, shape and bytes become one (``deduplicate``); the
       comparison first probes a few KB at both ends, and only tensors whose ends agree are
       hashed in full, streaming, and byte-compared.
    6. Nodes are put in topological order.
    """

    name = "cleanup"
    summary = "remove dead nodes, unused initializers/inputs and duplicate weights; sort topologically"
    Options = CleanupOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes_before = sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))
        inits_before = len(graph.initializers)
        modified = IdentityEliminationPass()(model).modified

        deduplicated = self._deduplicate_initializers(graph) if self.options.deduplicate else 0
        modified |= RemoveUnusedNodesPass()(model).modified
        removed_inputs = self._remove_unused_inputs(graph) if self.options.remove_unused_inputs else []
        modified |= bool(deduplicated or removed_inputs)
        modified |= RemoveUnusedFunctionsPass()(model).modified
        modified |= RemoveUnusedOpsetsPass()(model).modified

        order_before = [id(n) for n in graph]
        TopologicalSortPass()(model)
        reordered = order_before != [id(n) for n in graph]
        modified |= reordered

        nodes_after = sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))
        details = {
            "dead_nodes": nodes_before - nodes_after,
            "initializers_removed": inits_before - len(graph.initializers) - deduplicated,
            "duplicates_merged": deduplicated,
            "inputs_removed": removed_inputs,
            "reordered": reordered,
        }
        return QeffPassResult(model, modified=modified, details=details)

    @staticmethod
    def _remove_unused_inputs(graph: ir.Graph) -> list[str]:
        outputs = set(graph.outputs)
        unused = [v for v in graph.inputs if not v.uses() and v not in outputs]
        for value in unused:
            graph.inputs.remove(value)
            if value.name in graph.initializers:
                del graph.initializers[value.name]
        return [v.name for v in unused]

    @staticmethod
    def _deduplicate_initializers(graph: ir.Graph) -> int:
        boundary = set(graph.inputs) | set(graph.outputs)
        groups: dict[tuple, list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value in boundary or tensor.dtype == ir.DataType.STRING:
                continue
            groups[(tensor.dtype, tuple(tensor.shape))].append(value)

        merged = 0
        for candidates in groups.values():
            if len(candidates) < 2:
                continue
            by_probe: dict[bytes, list[ir.Value]] = defaultdict(list)
            for value in candidates:
                by_probe[_digest(value.const_value, probe_only=True)].append(value)
            for same_probe in by_probe.values():
                if len(same_probe) < 2:
                    continue
                # Rare: equal ends. Hash in full, streaming; equal digests are byte-compared.
                by_digest: dict[bytes, ir.Value] = {}
                for value in same_probe:
                    digest = _digest(value.const_value, probe_only=False)
                    twin = by_digest.get(digest)
                    if twin is None or not _same_bytes(twin.const_value, value.const_value):
                        by_digest.setdefault(digest, value)
                        continue
                    ir.convenience.replace_all_uses_with(value, twin)
                    del graph.initializers[value.name]
                    merged += 1
                    logger.debug("initializer %s merged into %s", value.name, twin.name)
        return merged


class _ByteReader:
    """Reads a tensor's stored bytes by range: ``pread`` on external data, no memory map.

    Reading the file directly keeps RSS flat on multi-gigabyte models and works for packed
    sub-byte types, whose bytes are compared as stored.
    """

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        self.size = tensor.nbytes
        self._fd: int | None = None
        self._bytes: bytes | None = None
        if isinstance(tensor, ir.ExternalTensor):
            self._fd = os.open(str(tensor.path), os.O_RDONLY)
            self._base = tensor.offset or 0
        else:
            self._bytes = tensor.tobytes()

    def read(self, start: int, size: int) -> bytes:
        size = max(0, min(size, self.size - start))  # never past this tensor's end
        if self._bytes is not None:
            return self._bytes[start : start + size]
        return os.pread(self._fd, size, self._base + start)

    def chunks(self):
        for start in range(0, self.size, _CHUNK_BYTES):
            yield self.read(start, _CHUNK_BYTES)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> _ByteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _digest(tensor: ir.TensorProtocol, *, probe_only: bool) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with _ByteReader(tensor) as reader:
        if probe_only:
            h.update(reader.read(0, _PROBE_BYTES))
            if reader.size > _PROBE_BYTES:
                h.update(reader.read(max(_PROBE_BYTES, reader.size - _PROBE_BYTES), _PROBE_BYTES))
        else:
            for chunk in reader.chunks():
                h.update(chunk)
    return h.digest()


def _same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    with _ByteReader(a) as ra, _ByteReader(b) as rb:
        return ra.size == rb.size and all(x == y for x, y in zip(ra.chunks(), rb.chunks()))
