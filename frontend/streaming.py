"""Exporting a checkpoint folder without ever holding its weights in memory.

The in-memory export loads the whole model (``from_pretrained``) and lets the exporter write
every parameter. Here the weights travel from the safetensors files to the ONNX data file one
bounded chunk at a time; what the process holds is the graph and the few small parameters that
the exporter's optimiser looks at. In order:

1. **Skeleton.** The model is built on the meta device, then every parameter gets *uninitialised*
   CPU storage: pages nobody writes are never resident (reading them maps the kernel's shared
   zero page). Non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``, ...) are
   computed by transformers' own ``initialize_weights``, which is how ``from_pretrained`` itself
   recreates them after building on meta; parameters are marked initialised so it leaves them
   alone.
2. **Small parameters for real.** The optimiser (onnxscript) folds constants only when every
   input has at most ``_FOLD_INPUT_LIMIT`` elements, except ``Transpose``, which it always folds,
   and it merges initializers of up to 1024 elements that have equal values. A parameter up to
   that limit can therefore change the graph through its values, so it is loaded (norm weights,
   biases: a few KB per layer). A larger one cannot: its values are never read.
3. **Trace and optimise.** The dynamo exporter runs without its optimiser, which this module
   then runs itself with the same settings plus a ``should_fold`` hook: a node reading a large
   parameter may fold only if the result is a view of it (``Transpose``, ``Identity``, reshapes)
   or does not depend on its values (``Shape``, ``Size``); anything else stays a node. Those are
   the default rules already (large inputs), so the graph is the one the in-memory export gets.
4. **Map every initializer to the checkpoint.** A folded ``Transpose`` of a parameter is a numpy
   view of the parameter's storage, so each initializer's data pointer, shape and strides say
   exactly which parameter it shows and how (the parameter itself, a contiguous part of it, or a
   permutation of its axes). Such an initializer becomes a :class:`StreamedTensor` of the
   checkpoint tensor. An initializer derived from a large parameter that is not such a view is
   refused: its bytes would be computed from uninitialised memory.
5. **Write.** Each streamed tensor is read with ``pread`` in chunks of about 16 MB, widened to
   float32 (exact for F16 and BF16) and written at its place in ``<name>.onnx.data``; permuted
   axes are written in blocks of source rows, each block scattered with ``pwrite``. The model
   and its data file appear atomically, as with the in-memory export.

The checkpoint must hold the model's own parameters under their own names (what
``save_pretrained`` writes for all but legacy layouts). A checkpoint that transformers converts
while loading (Mixtral's per-expert tensors fused into one) raises :class:`StreamingUnsupported`;
the caller then loads the model in memory instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qeff.common.progress import bytes_progress
from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .export import (
    EXTERNAL_DATA_THRESHOLD,
    _data_commit,
    _exportable_experts,
    _quiet_exporter,
    _Stages,
    _wrap,
    check_request,
    example_args,
    exporter_errors,
    input_names_for,
    staged_output,
)
from .loading import check_folder
from .safetensors_index import CheckpointTensor, read_checkpoint, read_rows

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir
    import torch

logger = logging.getLogger(__name__)

__all__ = ["StreamedExport", "StreamingUnsupported", "StreamedTensor", "build_skeleton", "export_folder_streaming"]

# onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT: above it only Transpose is folded.
_FOLD_INPUT_LIMIT = 8192
# Elements per chunk read from a checkpoint: 16 MB once widened to float32. A chunk briefly
# exists three times (raw bytes, float32, and reordered for a transposed weight), so this
# bounds the memory the copy takes to about 40 MB whatever the size of the model.
_CHUNK_ELEMENTS = 4 << 20
# Initializers up to this many bytes stay inline in the model file, as with onnx_ir's saver.
_INLINE_BYTES = 256
# Ops whose folded result is a view of their input (or the input itself).
_VIEW_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
# Ops whose folded result depends on the input's shape only.
_SHAPE_OPS = frozenset({"Shape", "Size"})

_HINT = "the checkpoint is incomplete or damaged, or does not belong to this config.json"


class StreamingUnsupported(Exception):
    """The folder can be exported, but not by streaming (the caller falls back to loading it)."""


@dataclass(frozen=True)
class StreamedExport:
    """What :func:`export_folder_streaming` wrote, and the facts about the model it came from."""

    path: Path
    architecture: str
    num_parameters: int
    parameter_bytes: int


@dataclass(frozen=True)
class _Large:
    """A parameter left uninitialised: where its storage is and which checkpoint tensor it is."""

    name: str
    start: int  # data pointer of the storage
    numel: int
    shape: tuple[int, ...]
    source: CheckpointTensor


@dataclass(frozen=True)
class _Layout:
    """How an initializer's elements sit in its source tensor: ``perm`` None is the contiguous
    range ``offset .. offset + numel``; otherwise the source with size-1 axes dropped
    (``squeezed``) is transposed by ``perm``."""

    shape: tuple[int, ...]
    offset: int = 0
    squeezed: tuple[int, ...] = ()
    perm: tuple[int, ...] | None = None


# --- 1 and 2: the skeleton ------------------------------------------------------------------


def _parameter_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter (a tied one has several), by parameter identity."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _checkpoint_tensor(names: list[str], shape: tuple[int, ...], checkpoint: dict[str, CheckpointTensor],
                       unknown: set[str]) -> CheckpointTensor:
    present = [checkpoint[n] for n in names if n in checkpoint]
    if not present:
        if unknown:
            # Tensors under names the model does not have: a layout transformers converts when
            # it loads (e.g. per-expert weights fused into one parameter), not a missing tensor.
            raise StreamingUnsupported(
                f"the checkpoint stores {names[0]!r} in another layout (it has {len(unknown)} tensors the "
                f"model does not name, e.g. {sorted(unknown)[0]!r})"
            )
        raise ExportError(f"the checkpoint has no tensor {names[0]!r}", _HINT)
    tensor = present[0]
    if tensor.shape != shape:
        raise ExportError(
            f"tensor {tensor.name!r} has shape {list(tensor.shape)} in {tensor.path.name}, "
            f"the model expects {list(shape)}",
            _HINT,
        )
    if not tensor.is_float:
        raise ExportError(
            f"tensor {tensor.name!r} is {tensor.dtype} in {tensor.path.name}; a float32, float16 or "
            "bfloat16 parameter is expected",
            _HINT,
        )
    return tensor


def _load_into(tensor: torch.Tensor, source: CheckpointTensor) -> None:
    torch, _ = require_torch()
    fd = os.open(source.path, os.O_RDONLY)
    try:
        values = read_rows(fd, source, 0, source.numel)
    finally:
        os.close(fd)
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))


def build_skeleton(
    folder: str | os.PathLike[str],
    checkpoint: dict[str, CheckpointTensor],
    *,
    attn_implementation: str = "eager",
) -> tuple[torch.nn.Module, list[_Large]]:
    """The float32 model of ``folder`` in eval mode, with its small parameters and all buffers
    real and its large parameters (see the module docstring) uninitialised; and those large
    parameters, each with its checkpoint tensor.

    Raises ExportError when a parameter has no tensor in the checkpoint or one of the wrong
    shape or dtype, and :class:`StreamingUnsupported` when the checkpoint's tensors are not the
    model's parameters under their own names.
    """
    torch, transformers = require_torch()
    folder = Path(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, dtype=torch.float32
            )
    except Exception as exc:
        logger.debug("skeleton traceback", exc_info=True)
        raise ExportError(
            f"building the model of {folder} failed: {exception_reason(exc, first_sentence=True)}",
            "check config.json; attn_implementation='eager' works for every supported architecture",
        ) from exc

    names = _parameter_names(model)
    known = {n for group in names.values() for n in group} | set(model.state_dict().keys())
    unknown = set(checkpoint) - known
    replaced: dict[int, torch.nn.Parameter] = {}
    large: list[_Large] = []
    small: list[tuple[torch.Tensor, CheckpointTensor]] = []
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                shape = tuple(param.shape)
                source = _checkpoint_tensor(names[id(param)], shape, checkpoint, unknown)
                real = torch.nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
                # transformers' initialisation skips what is marked initialised: it must neither
                # spend time on nor touch the storage of a parameter that comes from the file.
                real._is_hf_initialized = True
                replaced[id(param)] = real
                if real.numel() <= _FOLD_INPUT_LIMIT:
                    small.append((real, source))
                else:
                    large.append(_Large(names[id(param)][0], real.data_ptr(), real.numel(), shape, source))
            module._parameters[key] = replaced[id(param)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype)
    # Recomputes the buffers, as from_pretrained does after building on meta.
    model.initialize_weights()
    for tensor, source in small:
        _load_into(tensor, source)
    persistent = dict(model.named_buffers())
    for name in set(model.state_dict().keys()) & set(persistent) & set(checkpoint):
        if checkpoint[name].is_float and checkpoint[name].shape == tuple(persistent[name].shape):
            _load_into(persistent[name], checkpoint[name])
    if unknown:
        logger.debug("checkpoint tensors the model does not use: %s", sorted(unknown)[:10])
    model.eval()
    return model, large


# --- 3: optimising the traced graph --------------------------------------------------------


def _optimize(model: ir.Model, large_values: set[str]) -> set[str]:
    """Run the exporter's optimiser on ``model`` in place; return the names of the values that
    derive from a large parameter (its initializer, and what was folded from it)."""
    import onnxscript.optimizer

    derived = set(large_values)

    def should_fold(node: ir.Node) -> bool | None:
        if not any(v is not None and v.name in derived for v in node.inputs):
            return None
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in _VIEW_OPS:
            derived.update(v.name for v in node.outputs if v.name)
            return None
        if node.op_type in _SHAPE_OPS:
            return None
        return False

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    return derived


# --- 4: mapping initializers to the checkpoint -----------------------------------------------


def _layout(array: np.ndarray, param: _Large) -> _Layout | None:
    """How ``array`` (a view of ``param``'s storage) reads the parameter, or None if it is not a
    contiguous range or an axis permutation of it."""
    if array.dtype != np.float32 or any(s % 4 for s in array.strides):
        return None
    offset = (array.__array_interface__["data"][0] - param.start) // 4
    shape = tuple(array.shape)
    if array.flags.c_contiguous:
        if 0 <= offset and offset + array.size <= param.numel:
            return _Layout(shape, offset=offset)
        return None
    if offset != 0 or array.size != param.numel:
        return None
    squeezed = tuple(d for d in param.shape if d != 1)
    source_strides = {}
    stride = 1
    for axis in range(len(squeezed) - 1, -1, -1):
        source_strides[stride] = axis
        stride *= squeezed[axis]
    perm = []
    for size, element_stride in zip(array.shape, (s // 4 for s in array.strides)):
        if size == 1:
            continue
        axis = source_strides.get(element_stride)
        if axis is None or squeezed[axis] != size:
            return None
        perm.append(axis)
    if sorted(perm) != list(range(len(squeezed))):
        return None
    return _Layout(shape, squeezed=squeezed, perm=tuple(perm))


def _numpy_view(tensor: Any) -> np.ndarray | None:
    """The tensor's array without copying, when it has one in memory."""
    try:
        array = tensor.numpy()
    except Exception:  # e.g. a tensor type that cannot be shown as numpy: not one of ours
        return None
    return array if isinstance(array, np.ndarray) else None


def _stream_initializers(model: ir.Model, large: list[_Large], derived: set[str]) -> list[StreamedTensor]:
    """Replace every initializer that shows a large parameter by a tensor streamed from the
    checkpoint; refuse one derived from a large parameter some other way."""
    starts = sorted(large, key=lambda p: p.start)
    begins = [p.start for p in starts]
    streamed = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        array = _numpy_view(tensor)
        owner = None
        if array is not None and array.size:
            pointer = array.__array_interface__["data"][0]
            i = int(np.searchsorted(begins, pointer, side="right")) - 1
            if i >= 0 and pointer < starts[i].start + starts[i].numel * 4:
                owner = starts[i]
        if owner is None:
            if value.name in derived:
                raise ExportError(
                    f"initializer {value.name!r} is computed from a parameter, not a copy of one, so it "
                    "cannot be streamed from the checkpoint",
                    "export with streaming=False (loads the whole model)",
                )
            continue
        layout = _layout(array, owner)
        if layout is None:
            raise ExportError(
                f"initializer {value.name!r} reads {owner.name!r} in a way that cannot be streamed "
                f"(shape {list(array.shape)}, strides {list(array.strides)})",
                "export with streaming=False (loads the whole model)",
            )
        value.const_value = StreamedTensor(owner.source, layout, name=value.name)
        streamed.append(value.const_value)
    return streamed


# --- 5: writing ----------------------------------------------------------------------------


def _lazy_base() -> type:
    import onnx_ir as ir

    return ir.LazyTensor


class StreamedTensor(_lazy_base()):  # type: ignore[misc]
    """A float32 initializer whose values are (part of, or a permutation of) a checkpoint
    tensor, read from the file only when it is written (``tofile``: chunk by chunk) or read
    (``numpy``/``tobytes``: whole)."""

    def __init__(self, source: CheckpointTensor, layout: _Layout, *, name: str | None = None) -> None:
        import onnx_ir as ir

        super().__init__(self._whole, ir.DataType.FLOAT, ir.Shape(layout.shape), name=name)
        self.source = source
        self.layout = layout

    def _pieces(self, fd: int) -> Iterator[tuple[int, np.ndarray]]:
        """(element offset in this tensor, contiguous float32 run) pieces covering it once."""
        layout, source = self.layout, self.source
        total = math.prod(layout.shape)
        if layout.perm is None:
            for first in range(0, total, _CHUNK_ELEMENTS):
                count = min(_CHUNK_ELEMENTS, total - first)
                yield first, read_rows(fd, source, layout.offset + first, count)
            return
        squeezed, perm = layout.squeezed, layout.perm
        row = math.prod(squeezed[1:])
        per_block = max(1, _CHUNK_ELEMENTS // max(row, 1))
        out = [squeezed[p] for p in perm]
        axis = perm.index(0)  # where the source's rows land in the output
        outer = math.prod(out[:axis])
        inner = math.prod(out[axis + 1:])
        for first in range(0, squeezed[0], per_block):
            rows = min(per_block, squeezed[0] - first)
            block = read_rows(fd, source, first * row, rows * row).reshape(rows, *squeezed[1:])
            moved = np.ascontiguousarray(block.transpose(perm)).reshape(outer, rows, inner)
            for o in range(outer):
                yield (o * out[axis] + first) * inner, moved[o].reshape(-1)

    def _fill(self, write: Callable[[int, np.ndarray], None], advance: Callable[[int], None]) -> None:
        fd = os.open(self.source.path, os.O_RDONLY)
        try:
            done = 0
            for offset, piece in self._pieces(fd):
                write(offset, piece)
                done += piece.nbytes
                if done >= _CHUNK_ELEMENTS * 4:
                    advance(done)
                    done = 0
            advance(done)
        finally:
            os.close(fd)

    def _whole(self) -> Any:
        import onnx_ir as ir

        result = np.empty(math.prod(self.layout.shape), np.float32)

        def write(offset: int, piece: np.ndarray) -> None:
            result[offset:offset + piece.size] = piece

        self._fill(write, lambda nbytes: None)
        return ir.tensor(result.reshape(self.layout.shape), name=self.name)

    def tofile(self, file: Any, advance: Callable[[int], None] | None = None) -> None:
        """Write the tensor at the file's position, chunk by chunk (``advance(nbytes)`` after
        each); the position ends right after it."""
        file.flush()
        base = file.tell()
        fd = file.fileno()

        def write(offset: int, piece: np.ndarray) -> None:
            data = memoryview(piece).cast("B")
            position = base + offset * 4
            while data:
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written

        self._fill(write, advance or (lambda nbytes: None))
        file.seek(base + self.nbytes)


def _save(model: ir.Model, path: Path, *, external: bool, progress: bool) -> None:
    """Write ``model`` to ``path``; with ``external``, every initializer over a few hundred bytes
    goes to ``<name>.data`` beside it, written tensor by tensor (streamed ones chunk by chunk)."""
    import onnx_ir as ir

    if not external:
        ir.save(model, path)
        return
    data = path.name + ".data"
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    outside = [v for v in values if v.const_value.nbytes > _INLINE_BYTES]
    total = sum(v.const_value.nbytes for v in outside)
    with bytes_progress(total, "writing weights", progress) as advance, open(path.parent / data, "wb") as out:
        offset = 0
        for value in outside:
            tensor = value.const_value
            if isinstance(tensor, StreamedTensor):
                tensor.tofile(out, advance)
            else:
                out.write(tensor.tobytes())
                advance(tensor.nbytes)
            value.const_value = ir.ExternalTensor(
                data, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=path.parent
            )
            offset += tensor.nbytes
    ir.save(model, path)


# --- the export ----------------------------------------------------------------------------


def export_folder_streaming(
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    external_data: bool | None = None,
    attn_implementation: str = "eager",
    progress: bool = True,
) -> StreamedExport:
    """Export the causal LM in ``folder`` to ``output`` without loading its weights.

    The result is what ``export_causal_lm(load_causal_lm(folder), output)`` writes: the same
    graph and the same float32 initializers. ``external_data`` ``None`` means external (a
    ``.data`` file beside the model): an inline model would have to be serialised in memory;
    ``False`` does that, holding the weights in memory while the file is written.

    Only the dynamo exporter is supported (the TorchScript exporter serialises the parameters
    itself): :class:`StreamingUnsupported` for ``"torchscript"``, and for a checkpoint whose
    tensors are not the model's parameters. Raises :class:`~qeff.errors.ExportError` for a bad
    folder, a missing, truncated or mismatched tensor or shard, or a failed export; nothing is
    left at ``output`` then.
    """
    torch, _ = require_torch()
    output = check_request(output, exporter, opset)
    if exporter != "dynamo":
        raise StreamingUnsupported("the TorchScript exporter writes the parameters itself, so it needs them in memory")
    folder = Path(folder)
    model_type, _ = check_folder(folder)
    checkpoint = read_checkpoint(folder)
    model, large = build_skeleton(folder, checkpoint, attn_implementation=attn_implementation)
    num_parameters = sum(p.numel() for p in model.parameters())
    size = num_parameters * 4
    external = True if external_data is None else bool(external_data)
    names = input_names_for(model)
    logger.info(
        "streaming %s (%.1f MB of float32 parameters, %d tensors streamed) from %s to %s",
        model_type, size / 1e6, len(large), folder, output,
    )
    if not external and size > EXTERNAL_DATA_THRESHOLD:
        logger.warning("writing %.1f MB of weights inline: they are held in memory while the file is written",
                       size / 1e6)

    with staged_output(output) as staging, _Stages(progress) as stages:
        stages.stage(f"Tracing {model_type} ({size / 1e6:.1f} MB, weights left on disk)")
        args = example_args(model, names)
        wrapper = _wrap(model).eval()
        with exporter_errors(model_type, exporter), _quiet_exporter(), _exportable_experts(model), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                input_names=names,
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes={name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for name in names},
                optimize=False,
                verbose=False,
            )
            onnx_model = program.model
            stages.stage(f"Optimizing {model_type}")
            large_values = set()
            starts = {p.start for p in large}
            for value in onnx_model.graph.initializers.values():
                array = _numpy_view(value.const_value) if value.const_value is not None else None
                if array is not None and array.size and array.__array_interface__["data"][0] in starts:
                    large_values.add(value.name)
            derived = _optimize(onnx_model, large_values)
        streamed = _stream_initializers(onnx_model, large, derived)
        logger.debug("%d initializers streamed from the checkpoint", len(streamed))

        stages.stage(f"Writing {output.name}")
        try:
            _save(onnx_model, staging.path, external=external, progress=progress)
        except OSError as exc:
            raise ExportError(f"writing {output} failed: {exc.strerror or exc}", "check the free disk space") from exc
        del program, onnx_model, wrapper, model
        staging.commit(**_data_commit(staging, output))
    logger.info("wrote %s", output)
    return StreamedExport(output, model_type, num_parameters, size)
