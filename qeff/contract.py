"""The contract between the stages: KV I/O names, specialization symbols, the manifest, the
compile folder's file names.

Every stage reads these names from here and from nowhere else, so the interface QEfficient's
runner, qaic-runner and the Cloud AI vLLM plugin drive (DESIGN §3.1, §4) is spelled once:

- a KV model takes ``input_ids``, ``position_ids``, ``past_key.{i}`` / ``past_value.{i}``
  (and ``batch_index`` with continuous batching) and returns ``logits`` then
  ``past_key.{i}_RetainedState`` / ``past_value.{i}_RetainedState`` in layer order;
- the manifest ``<model>.qeff.json`` beside a rewritten model tells the backend and the runtime
  what the passes did (:class:`Manifest`, read back as data against its schema);
- the compile folder holds the files named by the ``*_NAME`` constants.

This module imports nothing from any stage.
"""

from __future__ import annotations

__all__ = [
    "INPUT_IDS", "POSITION_IDS", "ATTENTION_MASK", "BATCH_INDEX", "LOGITS", "RETAINED_SUFFIX",
    "BATCH_SIZE", "SEQ_LEN", "CTX_LEN", "FULL_BATCH_SIZE",
    "cache_input_name", "is_cache_input", "cache_layer", "cache_inputs_in_layer_order", "retained_name",
    "retained_pairs", "is_retained_output", "dynamic_cache_input_name", "HF_CACHE",
    "MANIFEST_FORMAT", "Manifest", "KVLayout", "manifest_path", "read_manifest", "write_manifest",
    "SPECIALIZATIONS_NAME", "CUSTOM_IO_NAME", "PARAMS_NAME", "COMMAND_NAME", "LOG_NAME", "QPC_DIR",
    "QPC_MARKER", "mdp_name",
]

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qeff.errors import ManifestError

logger = logging.getLogger(__name__)

# --- KV model I/O (DESIGN §3.1) ------------------------------------------------------------

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
BATCH_INDEX = "batch_index"
LOGITS = "logits"
RETAINED_SUFFIX = "_RetainedState"

# Specialization symbols: the dims of a KV model's inputs, sized per specialization.
BATCH_SIZE = "batch_size"
SEQ_LEN = "seq_len"
CTX_LEN = "ctx_len"
FULL_BATCH_SIZE = "full_batch_size"
# Decode-time inputs and their specialization symbols (QEfficient's names): how many logits rows
# a speculative-decoding target returns, and the compute context lengths attention reads.
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
COMP_CTX_LENGTHS = "comp_ctx_lengths"

# ONNX metadata the export writes: the checkpoint folder a model came from (its tokenizer is
# found there by ``qeff eval``). Passes carry metadata through, so rewritten models keep it.
CHECKPOINT_METADATA = "qeff.checkpoint"

_CACHE_KINDS = ("key", "value")
_CACHE_INPUT = re.compile(r"^past_(key|value)\.(\d+)$")


def _check_kind(kind: str) -> str:
    if kind not in _CACHE_KINDS:
        raise ValueError(f"cache kind must be one of {_CACHE_KINDS}, got {kind!r}")
    return kind


def cache_input_name(kind: str, layer: int) -> str:
    """``cache_input_name("key", 3)`` → ``past_key.3``."""
    return f"past_{_check_kind(kind)}.{layer}"


def is_cache_input(name: str | None) -> bool:
    return bool(name) and _CACHE_INPUT.match(name) is not None


def cache_layer(name: str) -> int:
    """The layer index of a cache input name."""
    match = _CACHE_INPUT.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a cache input name")
    return int(match.group(2))


def cache_inputs_in_layer_order(names: Iterable[str | None]) -> list[str]:
    """The cache input names among ``names``, key before value within a layer."""
    found = [n for n in names if is_cache_input(n)]
    return sorted(found, key=lambda n: (cache_layer(n), _CACHE_INPUT.match(n).group(1) != "key"))


def retained_name(cache_input: str) -> str:
    """The output that returns a cache input's updated state."""
    return f"{cache_input}{RETAINED_SUFFIX}"


def is_retained_output(name: str | None) -> bool:
    return bool(name) and name.endswith(RETAINED_SUFFIX)


def retained_pairs(input_names: Iterable[str], output_names: Iterable[str]) -> dict[str, str]:
    """{state input: its retained-state output} for every pair the model has."""
    outputs = set(output_names)
    return {name: retained_name(name) for name in input_names if retained_name(name) in outputs}


# Hugging Face's name for a model's cache: the keyword its forward takes, the attribute of its
# output, and the input names of an export *with* a dynamic cache (the form ``kv`` converts).
HF_CACHE = "past_key_values"


def dynamic_cache_input_name(layer: int, kind: str) -> str:
    """``dynamic_cache_input_name(0, "key")`` → the with-past export's input name for it."""
    return f"{HF_CACHE}.{layer}.{_check_kind(kind)}"


# --- compile folder (DESIGN §4) --------------------------------------------------------------

SPECIALIZATIONS_NAME = "specializations.json"
CUSTOM_IO_NAME = "custom_io.yaml"
PARAMS_NAME = "qeff-compile.json"
COMMAND_NAME = "command.txt"
LOG_NAME = "compile.log"
QPC_DIR = "qpc"
QPC_MARKER = Path(QPC_DIR) / "programqpc.bin"


def mdp_name(devices: int) -> str:
    """The multi-device partition file for ``devices`` devices."""
    return f"mdp_ts_{devices}.json"


# --- the manifest ----------------------------------------------------------------------------

MANIFEST_FORMAT = "qeff-manifest/1"


@dataclasses.dataclass
class KVLayout:
    """What ``kv`` built: the cache the backend declares and the runtime allocates."""

    layers: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    layout: str = "[batch, n_kv_heads, ctx_len, head_dim]"
    dtype: str = "float32"
    continuous_batching: bool = False
    full_batch_size: int | None = None
    logits: str = "last"
    precision: str | None = None  # the card's storage precision when a pass chose one (mxint8)
    visibility: list[str] | None = None  # per layer: "causal", "sliding window 4096", …


@dataclasses.dataclass
class Manifest:
    """``<model>.qeff.json``: what the passes did, for the backend and the runtime.

    Passes return the sections they set (``kv``, ``mx``, ``fixed``, ``fp16``, …) in their
    results and the manager merges them here. A manifest found beside an input model is read
    as data: every field is checked against its type, unknown keys are dropped, and
    ``side_files`` (texts written beside the model, such as the fp32 node list) is never taken
    from a file.
    """

    format: str = MANIFEST_FORMAT
    generator: str | None = None
    model: str | None = None
    source: str | None = None
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    kv: KVLayout | None = None
    retained_state: list[str] = dataclasses.field(default_factory=list)
    ctx_len: int | None = None
    specializations: list[dict[str, int]] = dataclasses.field(default_factory=list)
    mx: dict[str, Any] | None = None
    fixed: dict[str, Any] | None = None
    fp16: dict[str, Any] | None = None
    custom_io: dict[str, str] = dataclasses.field(default_factory=dict)
    node_precision_info: str | None = None
    spec: dict[str, Any] | None = None  # speculative-decoding target: {"k": [K, ...]}
    ccl: dict[str, Any] | None = None  # compute context lengths: {"prefill": [...], "decode": [...]}
    subfunctions: dict[str, Any] | None = None  # outlined layer functions: {"functions": [...], ...}
    # {manifest field: (file suffix, text)}: written beside the model, the field then names it.
    side_files: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def full_batch_size(self) -> int | None:
        return self.kv.full_batch_size if self.kv is not None else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("side_files")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "manifest") -> Manifest:
        """Read a manifest from JSON data, checking each field's type (a ``ValueError`` names
        the first field that does not fit)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{origin} is a {type(data).__name__}, not an object")
        values: dict[str, Any] = {}
        for field, check in _SCHEMA.items():
            if field in data and data[field] is not None:
                values[field] = check(data[field], f"{origin}: {field}")
        kv = values.get("kv")
        if kv is not None:
            values["kv"] = KVLayout(**{k: v for k, v in kv.items() if k in _KV_FIELDS})
        return cls(**values)


def _expect(kind: type | tuple[type, ...], what: str):
    def check(value: Any, where: str) -> Any:
        if isinstance(value, bool) and kind in (int, (int, float)):
            raise ValueError(f"{where} must be {what}, got {value!r}")
        if not isinstance(value, kind):
            raise ValueError(f"{where} must be {what}, got {type(value).__name__}")
        return value
    return check


def _list_of(item: Any, what: str):
    def check(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list of {what}")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def _mapping_of(value_check: Any, what: str):
    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where} must be an object of {what}")
        return {k: value_check(v, f"{where}.{k}") for k, v in value.items()}
    return check


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _kv_section(value: Any, where: str) -> dict[str, Any]:
    section = _expect(dict, "an object")(value, where)
    checks = {"layers": _positive_int, "n_kv_heads": _positive_int, "head_dim": _positive_int,
              "full_batch_size": _positive_int, "continuous_batching": _expect(bool, "true or false"),
              "layout": _expect(str, "text"), "dtype": _expect(str, "text"), "logits": _expect(str, "text"),
              "precision": _expect(str, "text"), "visibility": _list_of(_expect(str, "text"), "texts")}
    return {k: checks[k](v, f"{where}.{k}") for k, v in section.items() if k in checks and v is not None}


def _file_name(value: Any, where: str) -> str:
    """A file the manifest names lives beside the model: a plain name, no folders."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or "\0" in value:
        raise ValueError(f"{where} must be the name of a file beside the model, got {value!r}")
    return value


_KV_FIELDS = {f.name for f in dataclasses.fields(KVLayout)}
_TEXT = _expect(str, "text")
_OBJECT = _expect(dict, "an object")
_SCHEMA: dict[str, Any] = {
    "format": _TEXT,
    "generator": _TEXT,
    "model": _TEXT,
    "source": _TEXT,
    "passes": _list_of(_OBJECT, "objects"),
    "inputs": _list_of(_OBJECT, "objects"),
    "outputs": _list_of(_OBJECT, "objects"),
    "kv": _kv_section,
    "retained_state": _list_of(_TEXT, "names"),
    "ctx_len": _positive_int,
    "specializations": _list_of(_mapping_of(_positive_int, "positive integers"), "objects"),
    "mx": _OBJECT,
    "fixed": _OBJECT,
    "fp16": _OBJECT,
    "custom_io": _mapping_of(_TEXT, "precisions"),
    "node_precision_info": _file_name,
    "spec": _OBJECT,
    "ccl": _OBJECT,
    "subfunctions": _OBJECT,
}


def manifest_path(model_path: str | os.PathLike) -> Path:
    """``dir/name.onnx`` → ``dir/name.qeff.json``."""
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".qeff.json")


def read_manifest(model_path: str | os.PathLike) -> Manifest | None:
    """The manifest beside ``model_path``; None when there is none. A file there that is not a
    manifest, or whose fields do not fit the schema, raises :class:`ManifestError`."""
    path = manifest_path(model_path)
    if not path.is_file():
        return None
    # A file at the manifest's name that is not a manifest is refused, not skipped: what it
    # should have said (the KV layout, the compile defaults) would otherwise be silently lost.
    hint = "delete or move it; the passes that wrote the model write a new one"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"the manifest {path.name} cannot be read as JSON: {str(e).splitlines()[0]}",
                            hint) from None
    if not isinstance(data, dict):
        raise ManifestError(f"the manifest {path.name} is a {type(data).__name__}, not an object", hint)
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path.name} is not a {MANIFEST_FORMAT} manifest (format {data.get('format')!r})", hint)
    try:
        return Manifest.from_dict(data, origin=path.name)
    except ValueError as e:
        raise ManifestError(f"the manifest {path.name} is not valid: {e}",
                            "delete it, or re-run the passes that wrote it") from None


def write_manifest(model_path: str | os.PathLike, manifest: Manifest) -> list[Path]:
    """Write the manifest (and its side files) beside ``model_path``, each file atomically;
    returns the files written, side files first."""
    from qeff.common.atomic import write_text_atomic

    model_path = Path(model_path)
    side_files = manifest.side_files
    manifest = dataclasses.replace(manifest, model=model_path.name, side_files={})
    # Files a pass hands to the backend (fp16clip's -node-precision-info YAML) go next to the
    # model; the manifest names them.
    stem = model_path.name[: -len(".onnx")] if model_path.name.endswith(".onnx") else model_path.stem
    written = []
    for key, (suffix, text) in side_files.items():
        side = model_path.with_name(stem + suffix)
        written.append(write_text_atomic(side, text))
        setattr(manifest, key, side.name)
    path = manifest_path(model_path)
    written.append(write_text_atomic(path, json.dumps(manifest.to_dict(), indent=2, default=str) + "\n"))
    return written
