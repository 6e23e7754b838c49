"""Loading a Hugging Face causal LM from a local folder (``config.json`` + safetensors weights).

Only local folders are accepted (``local_files_only=True``): the exporter must not reach the
network, and a folder is what ``save_pretrained`` and ``huggingface-cli download --local-dir``
produce. Only safetensors weights are loaded, because ``.bin`` checkpoints are pickles that can
run arbitrary code. Every way the folder can be wrong is checked up front, so the user gets one
line saying what is missing instead of a transformers traceback.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "check_folder", "load_causal_lm"]

DTYPES = ("float32", "float16", "bfloat16")

_FOLDER_HINT = "pass a folder written by save_pretrained(..., safe_serialization=True): config.json plus *.safetensors"


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder} has no config.json", _FOLDER_HINT)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_path} is not readable JSON: {exc}", _FOLDER_HINT) from exc
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} is not a JSON object", _FOLDER_HINT)
    return config


def _check_weights(folder: Path) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        return weights
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        hint = (
            "only safetensors weights are loaded (pickled .bin/.pt files can run code); "
            "convert with save_pretrained(..., safe_serialization=True)"
        )
    else:
        hint = _FOLDER_HINT
    raise ExportError(f"{folder} has no *.safetensors weights", hint)


def _check_model_type(config: dict[str, Any], folder: Path) -> str:
    _, transformers = require_torch()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ExportError(
            f"unknown model type {model_type!r} in {folder / 'config.json'}",
            f"transformers {transformers.__version__} does not know it; models that need "
            "trust_remote_code are not supported",
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(
            f"model type {model_type!r} in {folder} is not a causal language model",
            "only decoder models loadable with AutoModelForCausalLM can be exported",
        )
    _refuse_non_attention(config, model_type, folder)
    return model_type


# Causal LMs whose layers (all, or some) are state-space, recurrent or convolution blocks: they
# keep a state, not a KV cache, so the passes have nothing to rebuild in them.
NON_ATTENTION_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm",  # no attention at all
    "jamba", "zamba", "zamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "lfm2",
    "plamo2", "qwen3_next", "minimax",  # hybrids: attention in some layers only
})
_ATTENTION_LAYER_TYPES = ("attention", "full_attention", "sliding_attention", "chunked_attention")


def _refuse_non_attention(config: dict[str, Any], model_type: str, folder: Path) -> None:
    """A model whose layers are not all attention is refused by name, before any export."""
    layer_types = config.get("layer_types")
    others = sorted({t for t in layer_types if t not in _ATTENTION_LAYER_TYPES}) \
        if isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types) else []
    if model_type in NON_ATTENTION_MODEL_TYPES or others:
        what = f"has {', '.join(others)} layers" if others else "has state-space, recurrent or convolution layers"
        raise ExportError(
            f"{model_type!r} in {folder} {what}, not only attention: it keeps a recurrent state, not a KV cache, "
            "and is not supported",
            "qeff-opt exports and rewrites decoder-only transformers (every layer attention)",
        )


def check_folder(folder: str | os.PathLike[str]) -> tuple[str, list[Path]]:
    """The model type and the safetensors files of the causal LM folder ``folder``.

    Raises :class:`~qeff.errors.ExportError` when the path is not a folder, has no
    ``config.json`` or no safetensors weights, or names a model type this transformers does not
    know or that is not a causal LM. Shared by the in-memory and the streaming loaders, so both
    refuse a bad folder with the same message.
    """
    require_torch()
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "missing"
        raise ExportError(f"{folder} is not a folder ({what})", _FOLDER_HINT)
    config = _read_config(folder)
    weights = _check_weights(folder)
    return _check_model_type(config, folder), weights


def load_causal_lm(
    folder: str | os.PathLike[str],
    dtype: str = "float32",
    *,
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """Load the causal LM saved in ``folder`` (single or sharded safetensors) in eval mode.

    ``dtype`` is one of :data:`DTYPES`. Raises :class:`~qeff.errors.ExportError` when the path
    is not a folder, has no ``config.json`` or no safetensors weights, names a model type this
    transformers does not know, or transformers fails to load it.
    """
    torch, transformers = require_torch()
    folder = Path(folder)
    model_type, weights = check_folder(folder)
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}", f"choose one of: {', '.join(DTYPES)}")

    logger.info("loading %s from %s (%d safetensors file(s))", model_type, folder, len(weights))
    try:
        # transformers shows its own progress bar over the shards of a large checkpoint.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
        )
    except Exception as exc:
        logger.debug("from_pretrained traceback", exc_info=True)
        raise ExportError(
            f"loading {model_type} from {folder} failed: {exception_reason(exc, first_sentence=True)}",
            "the folder may be incomplete (a shard named in the index missing) or damaged; "
            "enable debug logging for the full error",
        ) from exc
    model.eval()
    return model
