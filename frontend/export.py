"""Plain ONNX export of a Hugging Face causal LM: ``(input_ids, attention_mask, position_ids) -> logits``.

The export is deliberately *plain*: no KV cache, no fixed shapes, no dtype changes. Those are
the job of the graph passes, which expect exactly this interface:

- inputs ``input_ids``, ``attention_mask``, ``position_ids`` (int64, ``[batch, seq]``); a model
  whose forward takes no ``position_ids`` (ALiBi models such as MPT) has only the first two;
- one output ``logits`` (float, ``[batch, seq, vocab]``);
- ``batch`` and ``seq`` are symbolic dimensions with exactly those names.

Files appear atomically: the exporter writes into a temporary folder beside the destination and
the finished files are moved into place with ``os.replace``, so a failed or interrupted export
never leaves a half-written model where a later stage would pick it up.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qeff.common.atomic import Staging, unique_data_name
from qeff.common.datafiles import relink_data, replaced_data_files
from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .inputs import padded_batch
from .real_rope import real_valued_rope

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir
    import torch

logger = logging.getLogger(__name__)

__all__ = ["EXPORTERS", "export_causal_lm", "takes_position_ids"]

EXPORTERS = ("dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18

# Above this much parameter data the model goes to a separate ``.onnx.data`` file when the caller
# does not choose: protobuf cannot serialise more than 2 GiB, and loading a 1 GiB protobuf already
# costs several times its size in memory (see notes/export.md §6), while external data is mmap'd.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# The largest parameter (in elements) whose values the TorchScript export computes with when it
# folds constants: onnxscript's default input size limit, which the dynamo export folds with.
# The streaming export loads parameters up to this size and never reads the larger ones.
FOLD_INPUT_LIMIT = 8192
# Ops whose result is not a function of their inputs: never folded.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"})
# protobuf refuses to serialise a message of 2 GiB or more.
_PROTOBUF_LIMIT = 1 << 31

# Example input used to trace the model. Row 1 is right-padded so that tracing goes through the
# padding-mask code. transformers can skip building the mask for an all-ones mask outside of
# tracing; it disables that skip while tracing today (an all-ones example exports the same
# results with torch 2.13 / transformers 5.23), so this is a cheap safeguard, not a fix.
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQ = 8
_EXAMPLE_PAD = 2

# The dynamo exporter logs one warning per torchvision op it cannot register, on every export.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


def takes_position_ids(model: Any) -> bool:
    """Whether the HF model's ``forward`` accepts ``position_ids`` (False for ALiBi models like MPT).

    Read from the signature rather than keyed on the model type, so a new ALiBi family needs
    no change here. A ``**kwargs`` catch-all does not count: the model would silently ignore it.
    """
    parameters = inspect.signature(model.forward).parameters
    return "position_ids" in parameters


def input_names_for(model: Any) -> list[str]:
    """The ONNX input names the export of ``model`` will have, in order."""
    names = ["input_ids", "attention_mask"]
    if takes_position_ids(model):
        names.append("position_ids")
    return names


def _wrap(model: Any) -> torch.nn.Module:
    """A module with a fixed positional signature that returns only the logits tensor.

    The exporters name graph inputs after the forward parameters and cannot return a
    ``ModelOutput``, so the HF model is called with keywords and ``use_cache=False`` (a cache
    would add outputs; adding one is a graph pass's job, not the exporter's).
    The attribute is called ``m`` so dynamo's name scopes read ``m.model.layers.0...``.
    """
    torch, _ = require_torch()

    if takes_position_ids(model):

        class CausalLMLogits(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids):  # noqa: ANN001, ANN201
                out = self.m(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
                return out.logits

        return CausalLMLogits(model)

    class CausalLMLogitsNoPositions(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return CausalLMLogitsNoPositions(model)


def parameter_bytes(model: Any) -> int:
    """Bytes of parameter data, counting tied parameters once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _architecture(model: Any) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that says nothing about this export (restored afterwards)."""
    saved = []
    for name in _NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        saved.append((noisy, noisy.level))
        noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # dynamo=False is deprecated, and the tracer warns about every Python-level shape
            # computation; none of this is actionable for the user of the exported model.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch, _ = require_torch()
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            yield
    finally:
        for noisy, level in saved:
            noisy.setLevel(level)


@contextlib.contextmanager
def _exportable_experts(model: Any) -> Iterator[None]:
    """Switch a mixture-of-experts model off the ``grouped_mm`` kernel for the export.

    ``grouped_mm`` (transformers' default, and what a loaded checkpoint gets since the choice is
    not saved in config.json) has no ONNX lowering in either exporter. ``batched_mm`` computes
    the same result with Gather + MatMul. The model's own setting is restored afterwards.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if current != "grouped_mm" or not hasattr(model, "set_experts_implementation"):
        yield
        return
    logger.info("using experts_implementation='batched_mm' for the export (grouped_mm does not export)")
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


@contextlib.contextmanager
def exportable(model: Any) -> Iterator[None]:
    """Within the block the model runs on the exportable equivalents of what it uses: experts
    off ``grouped_mm``, RoPE without complex numbers (:mod:`.real_rope`)."""
    with _exportable_experts(model), real_valued_rope(model):
        yield


class _Stages:
    """A rich progress display of the export stages on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        self._task = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            # Off a terminal (CI logs, pytest capture) a live display only leaves blank lines.
            if console.is_terminal:
                self._progress = Progress(
                    SpinnerColumn(finished_text="[green]✓[/]"),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )

    def __enter__(self) -> _Stages:
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)

    def stage(self, description: str) -> None:
        logger.debug(description)
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, completed=1, total=1)
        self._task = self._progress.add_task(description, total=None)


def _run_exporter(
    wrapper: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    names: list[str],
    target: Path,
    *,
    exporter: str,
    opset: int | None,
    external: bool,
) -> None:
    torch, _ = require_torch()
    if exporter == "torchscript":
        model = trace_torchscript(wrapper, example, names, opset)
        fold_torchscript_constants(model)
        _save_torchscript(model, target, external)
        return
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    torch.onnx.export(
        wrapper,
        example,
        str(target),
        dynamo=True,
        input_names=names,
        output_names=["logits"],
        opset_version=opset,
        dynamic_shapes={name: {0: batch, 1: seq} for name in names},
        external_data=external,
        verbose=False,
    )


def trace_torchscript(
    wrapper: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], opset: int | None
) -> ir.Model:
    """The TorchScript exporter's graph of ``wrapper``, not yet folded, whose parameters are
    initializers that view the module's own tensors: no weight is copied or computed on.

    The exporter reads every parameter it knows as one: ``export_params`` serialises them into
    the protobuf, constant folding computes new tensors from them (a transposed copy of each
    MatMul weight), its initializer deduplication compares their values, and its shape
    inference copies those a node reads into a protobuf of that node (several times the
    largest parameter at once). So it is shown no parameter: the module's state is passed as
    extra inputs, named after the state dict, which the tracer matches with the tensors the
    forward pass reads (the same objects); they are bound as initializers here, and
    :func:`fold_torchscript_constants` does the folding without computing on a weight.
    """
    torch, _ = require_torch()
    import onnx
    import onnx_ir as ir

    state = _unique_state(wrapper)
    buffer = io.BytesIO()
    torch.onnx.export(
        _state_as_inputs(wrapper, len(names)),
        (*example, *state.values()),
        buffer,
        dynamo=False,
        input_names=[*names, *state],
        output_names=["logits"],
        opset_version=opset,
        dynamic_axes={name: {0: "batch", 1: "seq"} for name in [*names, "logits"]},
        # The weights are inputs here, so it would fold only the rest: all of it is left to
        # fold_torchscript_constants, which folds the weights' Transposes too.
        do_constant_folding=False,
        verbose=False,
    )
    model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    _bind_state(model, state, names)
    return model


def _state_as_inputs(wrapper: torch.nn.Module, count: int) -> torch.nn.Module:
    """``wrapper`` with no state of its own for the exporter: it is called with the first
    ``count`` arguments; the others are its state, so that the tracer sees it as inputs."""
    torch, _ = require_torch()

    class StateAsInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # The same submodules, so that the nodes are named after the same module scopes.
            for name, child in wrapper.named_children():
                self.add_module(name, child)
            # The exporter puts this module back in its mode afterwards, submodules included.
            self.train(wrapper.training)

        def forward(self, *args):  # noqa: ANN002, ANN201
            return wrapper(*args[:count])

        def state_dict(self, *args: Any, destination: Any = None, **kwargs: Any) -> Any:
            # How the exporter and the tracer find the parameters: they find none.
            return {} if destination is None else destination

    return StateAsInputs()


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with a tensor shared by several names (tied weights) under its
    first only, as the exporter names parameters: one graph input per tensor."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor
    return state


def _bind_state(model: ir.Model, state: dict[str, torch.Tensor], names: list[str]) -> None:
    """Turn every graph input beyond ``names`` into an initializer holding the state tensor of
    that name (a view, not a copy). The folding reads initializers, not graph inputs."""
    from onnx_ir.tensor_adapters import TorchTensor

    for value in list(model.graph.inputs):
        if value.name in names:
            continue
        tensor = state.get(value.name)
        if tensor is None:
            raise ExportError(
                f"the TorchScript exporter made {value.name!r} an input, but the model has no tensor of that name",
                "try exporter='dynamo'",
            )
        model.graph.inputs.remove(value)
        value.const_value = TorchTensor(tensor.detach(), name=value.name)
        model.graph.register_initializer(value)


def fold_torchscript_constants(model: ir.Model, *, input_size_limit: int = FOLD_INPUT_LIMIT) -> set[str]:
    """Fold what the TorchScript exporter's own constant folding would, in place; return the
    names of the values that show a parameter of more than ``input_size_limit`` elements (its
    initializer, and what was folded from it).

    A node folds when every input is an initializer or a ``Constant``; its outputs become
    initializers under their own names, and constants nobody reads any more are removed. Shape
    arithmetic on the graph inputs stays, as in the exporter's output. A large input is never
    computed on: the one node reading it that folds is a ``Transpose`` (the weight of a MatMul),
    into a numpy view of the input's storage, which the streaming export maps back to the
    checkpoint. So the result does not depend on the values of the large parameters.
    """
    import onnx_ir as ir

    opset = model.opset_imports.get("", None)
    arrays: dict[ir.Value, np.ndarray] = {}
    large: set[str] = set()
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            arrays[value] = value.const_value.numpy()
            if arrays[value].size > input_size_limit:
                large.add(value.name)
    for node in list(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = node.attributes.get("value")
            if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
                arrays[node.outputs[0]] = attribute.as_tensor().numpy()
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not _foldable(node, inputs, arrays):
            continue
        from_large = any(arrays[v].size > input_size_limit for v in inputs)
        if from_large:
            results = _transposed(node, arrays[inputs[0]]) if node.op_type == "Transpose" else None
        else:
            results = _evaluate(node, inputs, arrays, opset)
        if results is None:
            continue
        outputs = list(node.outputs)
        folded = [_constant(array) for array in results]
        for output, value in zip(outputs, folded):
            output.replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        for output, value, array in zip(outputs, folded, results):
            value.name = output.name
            model.graph.register_initializer(value)
            arrays[value] = array
            if from_large:
                large.add(value.name)
    _remove_unused_constants(model)
    return large


def _constant(array: np.ndarray) -> ir.Value:
    """An unnamed value holding ``array`` (not a copy of it)."""
    import onnx_ir as ir

    tensor = ir.Tensor(array)
    return ir.Value(type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)


def _foldable(node: ir.Node, inputs: list[ir.Value], arrays: dict[ir.Value, np.ndarray]) -> bool:
    """Whether ``node`` computes a constant: a deterministic standard op, constant inputs, no
    graph output (the exporter's outputs stay computed)."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _RANDOM_OPS
        and bool(inputs)
        and all(v in arrays for v in inputs)
        and not any(o.is_graph_output() for o in node.outputs)
    )


def _transposed(node: ir.Node, array: np.ndarray) -> list[np.ndarray]:
    perm = node.attributes.get_ints("perm", None)
    return [np.transpose(array, perm)]


def _evaluate(node: ir.Node, inputs: list[ir.Value], arrays: dict[ir.Value, np.ndarray],
              opset: int | None) -> list[np.ndarray] | None:
    """The outputs of ``node`` by onnx's reference implementation, or None if it has none for
    them (the node then stays: folding only saves work at run time)."""
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    feeds = {v.name: arrays[v] for v in inputs}
    try:
        results = ReferenceEvaluator(proto, opsets={"": opset} if opset else None).run(None, feeds)
    except Exception as exc:  # an op or an attribute the reference implementation lacks
        logger.debug("not folding %s %s: %s", node.op_type, node.name, exc)
        return None
    arrays_out = [np.asarray(r) for r in results]
    if len(arrays_out) != len(node.outputs):
        return None
    return arrays_out


def _remove_unused_constants(model: ir.Model) -> None:
    """Drop the ``Constant`` nodes and initializers that nothing reads any more."""
    graph = model.graph
    graph.remove([n for n in graph if n.op_type == "Constant" and not any(map(_is_read, n.outputs))], safe=True)
    for name, value in list(graph.initializers.items()):
        if not _is_read(value):
            del graph.initializers[name]


def _is_read(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


def _save_torchscript(model: ir.Model, target: Path, external: bool) -> None:
    """Write ``model`` as one protobuf, or with ``external`` its initializers over a few hundred
    bytes in ``<name>.data`` beside it (the layout of the dynamo export)."""
    import onnx_ir as ir

    if external:
        ir.save(model, target, external_data=target.name + ".data")
        return
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size >= _PROTOBUF_LIMIT:
        raise ExportError(
            f"the model's {size / 2**30:.1f} GiB of initializers do not fit in one protobuf file",
            "models over 2 GiB need external_data=True (or leave it unset)",
        )
    ir.save(model, target)


def check_request(output: str | os.PathLike[str], exporter: str, opset: int | None) -> Path:
    """The output path, once the exporter, the opset and the path itself make sense."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}", f"choose one of: {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset is not None and opset < DYNAMO_MIN_OPSET:
        # torch.onnx writes opset 18 anyway and says nothing; asking for 17 must not pass silently.
        raise ExportError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later, not {opset}",
            f"use exporter='torchscript' for opset {opset}",
        )
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"{output} is a folder", "give the path of the .onnx file to write")
    return output


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Staging]:
    """A staging folder beside ``output``; on any failure it is removed, and so is the output's
    parent folder when this export created it and it is still empty."""
    parent = output.parent
    created_parent = not parent.exists()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Staging(output)
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}", "choose a writable output folder") from exc
    try:
        yield staging
    except BaseException:
        staging.discard()
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


@contextlib.contextmanager
def exporter_errors(arch: str, exporter: str) -> Iterator[None]:
    """Turn an exception of the exporter into an ExportError that names the other exporter."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        logger.debug("exporter traceback", exc_info=True)
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(
            f"exporting {arch} with {exporter} failed: {exception_reason(exc)}",
            f"try exporter={other!r}, or enable debug logging for the full traceback",
        ) from exc


def example_args(model: Any, names: list[str]) -> tuple[torch.Tensor, ...]:
    """The tracing example for ``model``, one tensor per input name."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 2
    example = padded_batch(_EXAMPLE_BATCH, _EXAMPLE_SEQ, vocab, pad=_EXAMPLE_PAD)
    return tuple(example[name] for name in names)


def _data_commit(staging: Staging, output: Path) -> dict[str, Any]:
    """What to move with the model and what to remove after it. The exporter names the data
    file ``<name>.data``; when an earlier output already has a file of that name it is renamed
    to one unique to this export, so renaming the model stays the only commit point (the old
    model never pairs with new data). The data files the old model read go once it is replaced."""
    data = output.name + ".data"
    staged = staging.folder / data
    if staged.exists() and (output.parent / data).exists():
        unique = unique_data_name(output)
        os.replace(staged, staging.folder / unique)
        relink_data(staging.path, data, unique)
        data = unique
    if not (staging.folder / data).exists():
        return {"obsolete": replaced_data_files(output)}
    return {"companions": [data], "obsolete": replaced_data_files(output, keep={(output.parent / data).resolve()})}


def export_causal_lm(
    model: Any,
    output: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    external_data: bool | None = None,
    progress: bool = True,
) -> Path:
    """Export ``model`` (a transformers causal LM) to ``output`` and return the path written.

    ``exporter`` is ``"dynamo"`` (``torch.export``, optimised graph with symbolic shapes in
    ``value_info``) or ``"torchscript"`` (the legacy tracer, its constants folded by
    :func:`fold_torchscript_constants`). ``opset`` ``None`` keeps the
    exporter's default. ``external_data`` ``None`` means: only when the parameters exceed 1 GiB;
    the weights then go to ``<output>.data`` beside the model, referenced by a relative path.

    Raises :class:`~qeff.errors.ExportError` when the exporter fails; nothing is left at
    ``output`` then.
    """
    torch, _ = require_torch()
    output = check_request(output, exporter, opset)
    arch = _architecture(model)
    size = parameter_bytes(model)
    external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    names = input_names_for(model)
    logger.info(
        "exporting %s (%.1f MB of parameters) with %s to %s%s",
        arch,
        size / 1e6,
        exporter,
        output,
        " with external data" if external else "",
    )

    with staged_output(output) as staging, _Stages(progress) as stages:
        stages.stage(f"Preparing {arch} ({size / 1e6:.1f} MB)")
        args = example_args(model, names)
        wrapper = _wrap(model).eval()

        stages.stage(f"Exporting {arch} with {exporter}")
        target = staging.path
        with exporter_errors(arch, exporter), _quiet_exporter(), exportable(model), torch.no_grad():
            _run_exporter(wrapper, args, names, target, exporter=exporter, opset=opset, external=external)
        if not target.is_file():
            raise ExportError(f"exporting {arch} with {exporter} failed: the exporter wrote no file")

        stages.stage(f"Writing {output.name}")
        # Data first, model last: the model file appearing is what marks the export done.
        staging.commit(**_data_commit(staging, output))
    logger.info("wrote %s", output)
    return output
