"""cleanup: remove what the graph does not use and put the rest in a canonical order."""

from __future__ import annotations

__all__ = ["CleanupPass"]

import dataclasses
import hashlib
import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from qeff.passes.base import QeffPass

logger = logging.getLogger(__name__)

# Bytes read from each end of a tensor to tell candidates apart before any full comparison:
# random weights differ in their first bytes, so a multi-gigabyte model is deduplicated
# without reading it twice.
_PROBE_BYTES = 4096


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
       comparison first probes a few KB at both ends, then compares in full, reading
       memory-mapped weights without copying them.
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
        self.details = {
            "dead_nodes": nodes_before - nodes_after,
            "initializers_removed": inits_before - len(graph.initializers) - deduplicated,
            "duplicates_merged": deduplicated,
            "inputs_removed": removed_inputs,
            "reordered": reordered,
        }
        return ir.passes.PassResult(model, modified=modified)

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
                by_probe[_probe(value.const_value)].append(value)
            for same_probe in by_probe.values():
                kept: list[tuple[ir.Value, np.ndarray]] = []
                for value in same_probe:
                    data = _as_bytes_array(value.const_value)
                    twin = next((k for k, kd in kept if np.array_equal(kd, data)), None)
                    if twin is None:
                        kept.append((value, data))
                        continue
                    ir.convenience.replace_all_uses_with(value, twin)
                    del graph.initializers[value.name]
                    merged += 1
                    logger.debug("initializer %s merged into %s", value.name, twin.name)
        return merged


def _as_bytes_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A flat uint8 view of the tensor's bytes (a view into the memory map when external)."""
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1):
        return np.frombuffer(tensor.tobytes(), dtype=np.uint8)
    array = np.ascontiguousarray(tensor.numpy())
    return array.reshape(-1).view(np.uint8)


def _probe(tensor: ir.TensorProtocol) -> bytes:
    data = _as_bytes_array(tensor)
    head = data[:_PROBE_BYTES].tobytes()
    tail = data[-_PROBE_BYTES:].tobytes() if data.size > _PROBE_BYTES else b""
    return hashlib.blake2b(head + tail, digest_size=16).digest()
