"""Exporting a checkpoint folder without ever holding its weights in memory.

The in-memory export loads the whole model (``from_pretrained``) and writes every parameter
from memory. Here the weights travel from the safetensors files to the ONNX data file one
bounded chunk at a time; what the process holds is the graph and the few small parameters that
the exporter's optimiser looks at. In order:

1. **Skeleton.** The model is built on the meta device, then every parameter gets *uninitialised*
   CPU storage: pages nobody writes are never resident (reading them maps the kernel's shared
   zero page). Non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``, ...) are
   computed by transformers' own ``initialize_weights``, which is how ``from_pretrained`` itself
   recreates them after building on meta; parameters are marked initialised so it leaves them
   alone. Each parameter's source in the checkpoint is found as ``from_pretrained`` finds it,
   by transformers' own conversion mapping (:mod:`.streaming_sources`): usually the tensor of
   the same name, sometimes a renamed one, or several tensors that it joins into the parameter.
2. **Small parameters for real.** The optimiser (onnxscript) folds constants only when every
   input has at most ``_FOLD_INPUT_LIMIT`` elements, except ``Transpose``, which it always folds,
   and it merges initializers of up to 1024 elements that have equal values; the TorchScript
   export folds with the same limit and exception. A parameter up to that limit can therefore
   change the graph through its values, so it is loaded (norm weights, biases: a few KB per
   layer). A larger one cannot: its values are never read.
3. **Trace and optimise.** The dynamo exporter runs without its optimiser (its fake tensors
   never read a weight). The TorchScript exporter, which reads every parameter it knows as one
   (to serialise, fold, deduplicate and shape-infer them), is given the model's state as extra
   inputs instead, which then become initializers viewing the skeleton's tensors
   (:func:`~.export.trace_torchscript`); its tracer runs the forward pass, which only reads the
   uninitialised storage. For dynamo this module then runs onnxscript's optimiser with the
   settings of the in-memory export plus a ``should_fold`` hook: a node reading a large
   parameter may fold only if the result is a view of it (``Transpose``, ``Identity``,
   reshapes) or does not depend on its values (``Shape``, ``Size``); anything else stays a
   node. Those are the default rules already (large inputs), so the graph is the one the
   in-memory export gets. For TorchScript it runs the folding of the in-memory TorchScript
   export (:func:`~.export.fold_torchscript_constants`), whose one fold reading a large
   parameter is a ``Transpose``, into a view of it.
4. **Map every initializer to the checkpoint.** A folded ``Transpose`` of a parameter is a numpy
   view of the parameter's storage, so each initializer's data pointer, shape and strides say
   exactly which parameter it shows and how (the parameter itself, a contiguous part of it, or a
   permutation of its axes). Such an initializer becomes a :class:`StreamedTensor` of the
   parameter's source. An initializer derived from a large parameter that is not such a view is
   refused: its bytes would be computed from uninitialised memory.
5. **Write.** Each streamed tensor is read with ``pread`` in chunks of about 16 MB, widened to
   float32 (exact for F16 and BF16) and written at its place in ``<name>.onnx.data``; permuted
   axes are written in blocks of source rows, each block scattered with ``pwrite``. A chunk of
   a joined parameter (Mixtral's experts) is read from the pieces that hold it. The model and
   its data file appear atomically, as with the in-memory export.

A checkpoint whose tensors transformers converts in a way not reproduced here (anything but
renaming, stacking and concatenating; or tensors under names the model and its mapping do not
know, where a parameter then has none) raises :class:`StreamingUnsupported`; the caller then
loads the model in memory instead.
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
    FOLD_INPUT_LIMIT,
    _data_commit,
    exportable,
    _quiet_exporter,
    _Stages,
    _wrap,
    check_request,
    example_args,
    exporter_errors,
    fold_torchscript_constants,
    input_names_for,
    staged_output,
    trace_torchscript,
)
from .loading import check_folder
from .safetensors_index import CheckpointTensor, read_checkpoint
from .streaming_sources import (
    FusedTensor,
    Source,
    SourceMap,
    Unmapped,
    checkpoint_sources,
    open_files,
    pieces_of,
    read_elements,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir
    import torch

logger = logging.getLogger(__name__)

__all__ = ["StreamedExport", "StreamingUnsupported", "StreamedTensor", "build_skeleton", "export_folder_streaming"]

# onnxscript's DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT, and the TorchScript export's: above it
# only Transpose is folded.
_FOLD_INPUT_LIMIT = FOLD_INPUT_LIMIT
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
    """A parameter left uninitialised: where its storage is and where its values are in the
    checkpoint (one tensor, or several that transformers joins into it)."""

    name: str
    start: int  # data pointer of the storage
    numel: int
    shape: tuple[int, ...]
    source: Source


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


def _checkpoint_tensor(names: list[str], shape: tuple[int, ...], sources: SourceMap) -> Source:
    """The source of the parameter called ``names`` (a tied one has several), checked against it."""
    found = [sources.by_name[n] for n in names if n in sources.by_name]
    if not found:
        if sources.failure:
            raise StreamingUnsupported(sources.failure)
        if sources.unused:
            # Tensors under names the model does not have: a layout transformers converts when
            # it loads with a mapping this module does not see, not a missing tensor.
            raise StreamingUnsupported(
                f"the checkpoint stores {names[0]!r} in another layout (it has {len(sources.unused)} tensors the "
                f"model does not name, e.g. {sorted(sources.unused)[0]!r})"
            )
        raise ExportError(f"the checkpoint has no tensor {names[0]!r}", _HINT)
    source = found[0]
    if isinstance(source, Unmapped):
        raise StreamingUnsupported(
            f"the checkpoint stores {source.name!r} in pieces that are not streamed: {source.reason}"
        )
    if source.shape != shape:
        raise ExportError(f"{_shape_of(source)}, the model expects {list(shape)}", _HINT)
    for tensor in pieces_of(source):
        if not tensor.is_float:
            raise ExportError(
                f"tensor {tensor.name!r} is {tensor.dtype} in {tensor.path.name}; a float32, float16 or "
                "bfloat16 parameter is expected",
                _HINT,
            )
    return source


def _shape_of(source: Source) -> str:
    if isinstance(source, FusedTensor):
        return (f"the {len(source.pieces)} tensors joined into {source.name!r} (from {source.pieces[0].name!r} on) "
                f"make shape {list(source.shape)}")
    return f"tensor {source.name!r} has shape {list(source.shape)} in {source.path.name}"


def _load_into(tensor: torch.Tensor, source: Source) -> None:
    torch, _ = require_torch()
    with open_files() as files:
        values = read_elements(files, source, 0, tensor.numel())
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
    parameters, each with its source in the checkpoint: the tensor ``from_pretrained`` would
    load into it, or the tensors it would join into it (see :mod:`.streaming_sources`).

    Raises ExportError when a parameter has no tensor in the checkpoint or one of the wrong
    shape or dtype, and :class:`StreamingUnsupported` when a parameter is in the checkpoint in a
    layout that is not streamed.
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
    sources = checkpoint_sources(model, checkpoint)
    replaced: dict[int, torch.nn.Parameter] = {}
    large: list[_Large] = []
    small: list[tuple[torch.Tensor, Source]] = []
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                shape = tuple(param.shape)
                source = _checkpoint_tensor(names[id(param)], shape, sources)
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
    for name in set(model.state_dict().keys()) & set(persistent) & set(sources.by_name):
        source = sources.by_name[name]
        if isinstance(source, Unmapped) or source.shape != tuple(persistent[name].shape):
            continue
        if all(t.is_float for t in pieces_of(source)):
            _load_into(persistent[name], source)
    if sources.unused:
        logger.debug("checkpoint tensors the model does not use: %s", sorted(sources.unused)[:10])
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


def _strides(shape: tuple[int, ...] | list[int]) -> list[int]:
    """Element strides of a C-ordered array of ``shape``."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    return strides


def _permuted_pieces(read: Callable[[int, int], np.ndarray], squeezed: tuple[int, ...],
                     perm: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """The pieces of ``source.transpose(perm)`` (source of shape ``squeezed``, read in its flat
    order by ``read``), each block of the source about ``_CHUNK_ELEMENTS`` long.

    A block is a range along one source axis with the axes after it whole and single indices
    on the axes before it: the first axis whose trailing part fits a chunk, so that a 3-D
    parameter (experts first) is read in rows, not in whole experts. Transposed, a block is a
    box of the output, written as one run per index of the output axes before its last
    partial axis."""
    rank = len(squeezed)
    out_shape = [squeezed[a] for a in perm]
    source_strides, out_strides = _strides(squeezed), _strides(out_shape)
    axis = next(a for a in range(rank) if math.prod(squeezed[a + 1:]) <= _CHUNK_ELEMENTS)
    row = math.prod(squeezed[axis + 1:])
    per_block = max(1, _CHUNK_ELEMENTS // max(row, 1))
    for prefix in np.ndindex(*squeezed[:axis]):
        for first in range(0, squeezed[axis], per_block):
            rows = min(per_block, squeezed[axis] - first)
            start = [*prefix, first] + [0] * (rank - axis - 1)
            size = [1] * axis + [rows, *squeezed[axis + 1:]]
            block = read(sum(i * s for i, s in zip(start, source_strides)), math.prod(size)).reshape(size)
            moved = np.ascontiguousarray(block.transpose(perm))
            out_start = [start[a] for a in perm]
            partial = [i for i in range(rank) if moved.shape[i] != out_shape[i]]
            split = partial[-1] if partial else 0  # output axes from here on are one run
            runs = moved.reshape(-1, math.prod(moved.shape[split:]))
            offsets = np.asarray(sum(i * s for i, s in zip(out_start, out_strides)))
            for size_o, stride in zip(moved.shape[:split], out_strides[:split]):
                offsets = offsets[..., None] + np.arange(size_o) * stride
            for offset, values in zip(offsets.reshape(-1).tolist(), runs):
                yield offset, values


def _lazy_base() -> type:
    import onnx_ir as ir

    return ir.LazyTensor


class StreamedTensor(_lazy_base()):  # type: ignore[misc]
    """A float32 initializer whose values are (part of, or a permutation of) a parameter in the
    checkpoint (one tensor, or a :class:`~.streaming_sources.FusedTensor` of several), read from
    the files only when it is written (``tofile``: chunk by chunk) or read (``numpy``/``tobytes``:
    whole)."""

    def __init__(self, source: Source, layout: _Layout, *, name: str | None = None) -> None:
        import onnx_ir as ir

        super().__init__(self._whole, ir.DataType.FLOAT, ir.Shape(layout.shape), name=name)
        self.source = source
        self.layout = layout

    def _pieces(self, read: Callable[[int, int], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """(element offset in this tensor, contiguous float32 run) pieces covering it once;
        ``read(first, count)`` gives elements of the source in its flat order."""
        layout = self.layout
        total = math.prod(layout.shape)
        if layout.perm is None:
            for first in range(0, total, _CHUNK_ELEMENTS):
                count = min(_CHUNK_ELEMENTS, total - first)
                yield first, read(layout.offset + first, count)
            return
        yield from _permuted_pieces(read, layout.squeezed, layout.perm)

    def _fill(self, write: Callable[[int, np.ndarray], None], advance: Callable[[int], None]) -> None:
        with open_files() as files:
            done = 0
            for offset, piece in self._pieces(lambda first, count: read_elements(files, self.source, first, count)):
                write(offset, piece)
                done += piece.nbytes
                if done >= _CHUNK_ELEMENTS * 4:
                    advance(done)
                    done = 0
            advance(done)

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


def _trace(wrapper: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], *, exporter: str,
           opset: int | None) -> ir.Model:
    """The exporter's graph of ``wrapper``, before any optimisation, whose initializers are the
    skeleton's tensors themselves (numpy views of their storage)."""
    torch, _ = require_torch()
    if exporter == "torchscript":
        # Traced with the weights left to this module (see trace_torchscript): the
        # tracer's forward pass only reads the uninitialised storage, never writes it.
        return trace_torchscript(wrapper, args, names, opset)
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
    return program.model


def _initializers_of(model: ir.Model, large: list[_Large]) -> set[str]:
    """The names of the initializers that are the large parameters."""
    starts = {p.start for p in large}
    names = set()
    for value in model.graph.initializers.values():
        array = _numpy_view(value.const_value) if value.const_value is not None else None
        if array is not None and array.size and array.__array_interface__["data"][0] in starts:
            names.add(value.name)
    return names


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

    Both exporters stream, with the same result as their in-memory export. Raises
    :class:`StreamingUnsupported` for a checkpoint whose tensors are not the model's parameters,
    and :class:`~qeff.errors.ExportError` for a bad folder, a missing, truncated or mismatched
    tensor or shard, or a failed export; nothing is left at ``output`` then.
    """
    torch, _ = require_torch()
    output = check_request(output, exporter, opset)
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
        stages.stage(f"Tracing {model_type} with {exporter} ({size / 1e6:.1f} MB, weights left on disk)")
        args = example_args(model, names)
        wrapper = _wrap(model).eval()
        with exporter_errors(model_type, exporter), _quiet_exporter(), exportable(model), torch.no_grad():
            onnx_model = _trace(wrapper, args, names, exporter=exporter, opset=opset)
            stages.stage(f"Optimizing {model_type}")
            if exporter == "torchscript":
                derived = fold_torchscript_constants(onnx_model, input_size_limit=_FOLD_INPUT_LIMIT)
            else:
                derived = _optimize(onnx_model, _initializers_of(onnx_model, large))
        streamed = _stream_initializers(onnx_model, large, derived)
        logger.debug("%d initializers streamed from the checkpoint", len(streamed))

        stages.stage(f"Writing {output.name}")
        try:
            _save(onnx_model, staging.path, external=external, progress=progress)
        except OSError as exc:
            raise ExportError(f"writing {output} failed: {exc.strerror or exc}", "check the free disk space") from exc
        del onnx_model, wrapper, model
        staging.commit(**_data_commit(staging, output))
    logger.info("wrote %s", output)
    return StreamedExport(output, model_type, num_parameters, size)
