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
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qeff.common.atomic import Staging, unique_data_name
from qeff.common.datafiles import relink_data, replaced_data_files
from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .inputs import padded_batch

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["EXPORTERS", "export_causal_lm", "takes_position_ids"]

EXPORTERS = ("dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18

# Above this much parameter data the model goes to a separate ``.onnx.data`` file when the caller
# does not choose: protobuf cannot serialise more than 2 GiB, and loading a 1 GiB protobuf already
# costs several times its size in memory (see notes/export.md §6), while external data is mmap'd.
EXTERNAL_DATA_THRESHOLD = 1 << 30

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
    common: dict[str, Any] = {
        "input_names": names,
        "output_names": ["logits"],
        "opset_version": opset,
        "verbose": False,
    }
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("seq")
        torch.onnx.export(
            wrapper,
            example,
            str(target),
            dynamo=True,
            dynamic_shapes={name: {0: batch, 1: seq} for name in names},
            external_data=external,
            **common,
        )
        return
    torch.onnx.export(
        wrapper,
        example,
        str(target),
        dynamo=False,
        dynamic_axes={name: {0: "batch", 1: "seq"} for name in [*names, "logits"]},
        do_constant_folding=True,
        **common,
    )
    _fix_torchscript_external_data(target, external)


def _fix_torchscript_external_data(target: Path, external: bool) -> None:
    """Bring the TorchScript exporter's file layout in line with dynamo's.

    The legacy exporter has no external-data switch: it writes one protobuf, or above 2 GiB one
    file per tensor. Re-save into the single ``<name>.onnx.data`` layout when asked for, and
    refuse the scattered layout otherwise.
    """
    import onnx

    strays = [p for p in target.parent.iterdir() if p != target]
    if not external:
        if strays:
            raise ExportError(
                f"the TorchScript exporter wrote {len(strays)} external tensor files",
                "models over 2 GiB need external_data=True (or leave it unset)",
            )
        return
    model = onnx.load(str(target))  # reads the scattered tensors, if any
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        # onnx's default threshold (1 KiB): scalars and small tables stay inline, as with dynamo.
        size_threshold=1024,
    )
    for stray in strays:
        if stray.name != target.name + ".data":
            stray.unlink()


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
    ``value_info``) or ``"torchscript"`` (the legacy tracer). ``opset`` ``None`` keeps the
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
        with exporter_errors(arch, exporter), _quiet_exporter(), _exportable_experts(model), torch.no_grad():
            _run_exporter(wrapper, args, names, target, exporter=exporter, opset=opset, external=external)
        if not target.is_file():
            raise ExportError(f"exporting {arch} with {exporter} failed: the exporter wrote no file")

        stages.stage(f"Writing {output.name}")
        # Data first, model last: the model file appearing is what marks the export done.
        staging.commit(**_data_commit(staging, output))
    logger.info("wrote %s", output)
    return output
