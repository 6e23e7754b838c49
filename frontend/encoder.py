"""Encoder models (BERT, RoBERTa, XLM-R): tiny built-ins or a local folder, exported the classic way.

Tasks and their outputs:

- ``base``: ``last_hidden_state`` [batch_size, sequence_length, hidden] and ``pooler_output``
  [batch_size, hidden];
- ``qa``: ``start_logits`` and ``end_logits`` [batch_size, sequence_length];
- ``classification``: ``logits`` [batch_size, labels];
- ``embeddings``: ``sentence_embedding`` [batch_size, hidden], the mean of the last hidden
  states over the tokens the attention mask keeps.

Inputs are ``input_ids``, ``attention_mask`` and, where the model has token types,
``token_type_ids`` (int64, [batch_size, sequence_length]). The export uses the TorchScript
exporter at opset 17 with those two dims named ``batch_size`` and ``sequence_length``: the flow
the Cloud AI compiler's ``-onnx-define-symbol`` expects.
"""

from __future__ import annotations

__all__ = ["ENCODER_ARCHITECTURES", "ENCODER_TASKS", "is_encoder_folder", "build_tiny_encoder", "load_encoder",
           "export_encoder", "EncoderExport", "encoder_inputs"]

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from qeff.errors import ExportError

from ._deps import require_torch
from .randomize import randomize_parameters

ENCODER_ARCHITECTURES = ("bert", "roberta", "xlm-roberta")
ENCODER_TASKS = ("base", "qa", "classification", "embeddings")
_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "xlm-roberta"}
_SIZES = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "max_position_embeddings": 130}
_OUTPUTS = {"base": ["last_hidden_state", "pooler_output"], "qa": ["start_logits", "end_logits"],
            "classification": ["logits"], "embeddings": ["sentence_embedding"]}
_OPSET = 17


def _check(arch: str | None, task: str) -> None:
    if arch is not None and arch not in ENCODER_ARCHITECTURES:
        raise ExportError(f"unknown tiny encoder {arch!r}", f"choose one of {', '.join(ENCODER_ARCHITECTURES)}")
    if task not in ENCODER_TASKS:
        raise ExportError(f"unknown encoder task {task!r}", f"choose one of {', '.join(ENCODER_TASKS)}")


def _head(transformers: Any, task: str):
    return {"base": transformers.AutoModel, "qa": transformers.AutoModelForQuestionAnswering,
            "classification": transformers.AutoModelForSequenceClassification,
            "embeddings": transformers.AutoModel}[task]


def is_encoder_folder(source: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds one of the encoder architectures (by its config.json)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in ENCODER_ARCHITECTURES
    except ValueError:
        return False


def build_tiny_encoder(arch: str, task: str = "base", seed: int = 0) -> Any:
    """The tiny ``arch`` encoder with the ``task`` head, float32, eval mode, weights from ``seed``."""
    _check(arch, task)
    torch, transformers = require_torch()
    labels = 3 if task == "classification" else 2  # a QA head has two: start and end
    # RoBERTa-family checkpoints have one token type, i.e. no token_type_ids input.
    extra = {"type_vocab_size": 1, "pad_token_id": 1} if arch != "bert" else {"pad_token_id": 0}
    config = transformers.AutoConfig.for_model(_MODEL_TYPES[arch], **_SIZES, num_labels=labels, **extra)
    with torch.random.fork_rng(devices=[]):
        model = _head(transformers, task).from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_parameters(model, seed)
    return model.eval()


def load_encoder(folder: str | Path, task: str = "base") -> Any:
    """An encoder from a local folder (config.json + safetensors) with the ``task`` head."""
    _check(None, task)
    torch, transformers = require_torch()
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json", "give a folder saved with save_pretrained()")
    try:
        model = _head(transformers, task).from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                          attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load an encoder from {path}: {str(e).splitlines()[0]}",
                          "the folder needs config.json and model.safetensors") from None
    return model.eval()


def _has_token_types(model: Any) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 1


def encoder_inputs(model: Any) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if _has_token_types(model) else [])


def _wrapper(model: Any, task: str, names: list[str]):
    torch, _ = require_torch()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            kwargs = dict(zip(names, args))
            out = self.model(**kwargs)
            if task == "base":
                return out.last_hidden_state, out.pooler_output
            if task == "qa":
                return out.start_logits, out.end_logits
            if task == "classification":
                return out.logits
            mask = kwargs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return Encoder().eval()


@dataclasses.dataclass
class EncoderExport:
    path: Path
    task: str
    architecture: str
    inputs: list[str]
    outputs: list[str]
    max_abs_diff: float | None
    seconds: float


def _example(names: list[str], batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(3, vocab, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64)}
    if batch > 1:
        feeds["attention_mask"][-1, seq // 2:] = 0  # one padded row
    if "token_type_ids" in names:
        feeds["token_type_ids"] = (np.arange(seq) >= seq // 2).astype(np.int64)[None].repeat(batch, 0)
    return {n: feeds[n].astype(np.int64) for n in names}


def export_encoder(model: Any, task: str, output: str | Path, *, check: bool = True) -> EncoderExport:
    """Export ``model`` (with its ``task`` head) to ``output``; with ``check``, onnxruntime is
    compared with torch on a padded batch (the largest difference is reported)."""
    _check(None, task)
    torch, _ = require_torch()
    names = encoder_inputs(model)
    outputs = _OUTPUTS[task]
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    for o in outputs:
        axes[o] = {0: "batch_size", 1: "sequence_length"} if o in ("last_hidden_state", "start_logits", "end_logits") \
            else {0: "batch_size"}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    vocab = model.config.vocab_size
    example = _example(names, 2, 8, vocab)
    start = time.perf_counter()
    wrapper = _wrapper(model, task, names)
    from .export import _quiet_exporter

    try:
        with _quiet_exporter():  # the tracer's warnings about Python values are expected here
            torch.onnx.export(wrapper, tuple(torch.from_numpy(example[n]) for n in names), str(output),
                              input_names=names, output_names=outputs, dynamic_axes=axes, opset_version=_OPSET,
                              dynamo=False)
    except Exception as e:  # torch raises many types from its exporters
        raise ExportError(f"the encoder export failed: {str(e).splitlines()[0]}", "report the model and task") from None
    seconds = time.perf_counter() - start
    diff = None
    if check:
        from qeff.common.onnxrt import run_model

        feeds = _example(names, 3, 11, vocab, seed=1)
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feeds[n]) for n in names))
        want = want if isinstance(want, tuple) else (want,)
        got = run_model(output, feeds)
        diff = max(float(np.max(np.abs(got[o] - w.numpy()))) for o, w in zip(outputs, want))
    arch = getattr(model.config, "model_type", "encoder")
    meta = {"task": task, "architecture": arch, "inputs": names, "outputs": outputs}
    output.with_name(output.name[:-5] + ".encoder.json" if output.name.endswith(".onnx") else output.name + ".encoder.json") \
        .write_text(json.dumps(meta, indent=2) + "\n")
    return EncoderExport(output, task, arch, names, outputs, diff, seconds)
