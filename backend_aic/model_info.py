"""What the compiler needs to know about a rewritten model: its KV I/O, symbols and manifest."""

from __future__ import annotations

__all__ = ["ModelInfo", "read_model_info"]

import dataclasses
import os
from pathlib import Path

import onnx_ir as ir

from qeff.contract import BATCH_INDEX, Manifest, cache_inputs_in_layer_order, read_manifest, retained_name
from qeff.errors import QeffError


@dataclasses.dataclass
class ModelInfo:
    path: Path
    manifest: Manifest
    kv_inputs: list[str]  # the cache inputs in layer order
    retained_outputs: list[str]  # the matching retained-state outputs
    input_dims: dict[str, list[int | str | None]]
    continuous_batching: bool
    output_names: list[str] = dataclasses.field(default_factory=list)

    @property
    def has_kv(self) -> bool:
        return bool(self.kv_inputs)

    def cache_length(self) -> int | str | None:
        """The cache length dim of the KV inputs: a number when fixed, else its symbol."""
        dims = self.input_dims.get(self.kv_inputs[0]) if self.kv_inputs else None
        return dims[2] if dims and len(dims) == 4 else None

    def symbols(self) -> set[str]:
        return {d for dims in self.input_dims.values() for d in dims if isinstance(d, str)}


def read_model_info(model: str | os.PathLike) -> ModelInfo:
    """Read the graph's interface (no weight is read) and the manifest beside it, if any."""
    path = Path(model)
    if not path.is_file():
        raise QeffError(f"model {path} does not exist", "give the .onnx that qeff-opt wrote")
    try:
        manifest = read_manifest(path) or Manifest()
    except ValueError as e:
        raise QeffError(f"the manifest beside {path.name} is not valid: {e}",
                        "re-run qeff-opt to write it again, or delete it") from None
    try:
        graph = ir.load(path).graph
    except Exception as e:  # onnx/protobuf raise many types for a broken file
        raise QeffError(f"cannot read {path.name} as ONNX: {e}", "give the .onnx that qeff-opt wrote") from None
    dims = {v.name: [d if isinstance(d, int) else (d.value if d is not None else None) for d in v.shape]
            if v.shape is not None else [] for v in graph.inputs}
    past = cache_inputs_in_layer_order(v.name for v in graph.inputs)
    outputs = {v.name for v in graph.outputs}
    retained = [retained_name(name) for name in past if retained_name(name) in outputs]
    return ModelInfo(path=path, manifest=manifest, kv_inputs=past, retained_outputs=retained, input_dims=dims,
                     continuous_batching=BATCH_INDEX in dims, output_names=[v.name for v in graph.outputs])
