"""Tiny, randomly initialised Hugging Face causal LMs for tests and demos.

Every architecture the project claims to handle gets one small configuration here: 2 layers,
hidden size 64, 4 attention heads of size 16 and a 512-token vocabulary. The models are big
enough to contain every structural feature the graph passes care about (GQA/MQA, rotary or
learned or ALiBi positions, fused QKV, mixture of experts) and small enough to export in a few
seconds on a laptop CPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .randomize import randomize_parameters

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "build_tiny_model"]

TINY_ARCHITECTURES: tuple[str, ...] = (
    "gpt2",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "phi3",
    "falcon",
    "gptj",
    "mpt",
    "codegen",
    "starcoder2",
    "gemma",
)

_LAYERS = 2
_HIDDEN = 64
_HEADS = 4
_HEAD_DIM = _HIDDEN // _HEADS
_INTERMEDIATE = 128
_VOCAB = 512
_POSITIONS = 256
# Partial rotary (GPT-J and CodeGen rotate only the first `rotary_dim` channels of a head); half
# of the head keeps that feature visible in the graph.
_ROTARY_DIM = 8

# Token ids inside the tiny vocabulary: several configs default to ids of the real tokenizer
# (GPT-2's 50256, Phi-3's 32000) which would point outside a 512-row embedding.
_SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# The Llama-style configs share their field names; only the KV-head count differs.
_LLAMA_LIKE_KV_HEADS = {
    "llama": 2,
    "mistral": 2,
    "mixtral": 2,
    "qwen2": 2,
    "phi3": 2,
    "starcoder2": 2,
    "gemma": 1,  # multi-query attention, as in the real Gemma-2B
}


def _config_kwargs(arch: str) -> dict[str, Any]:
    """The constructor arguments of the tiny config of ``arch`` (without special tokens)."""
    if arch in _LLAMA_LIKE_KV_HEADS:
        kwargs: dict[str, Any] = {
            "hidden_size": _HIDDEN,
            "intermediate_size": _INTERMEDIATE,
            "num_hidden_layers": _LAYERS,
            "num_attention_heads": _HEADS,
            "num_key_value_heads": _LLAMA_LIKE_KV_HEADS[arch],
            "max_position_embeddings": _POSITIONS,
            "vocab_size": _VOCAB,
        }
        if arch == "gemma":
            # Gemma's default head_dim is 256 regardless of hidden size.
            kwargs["head_dim"] = _HEAD_DIM
        if arch == "mixtral":
            kwargs["num_local_experts"] = 4
            kwargs["num_experts_per_tok"] = 2
            # The default "grouped_mm" experts kernel has no ONNX lowering in either exporter
            # (dynamo: no function for grouped_mm_fallback; TorchScript: aten::histc).
            # "batched_mm" computes the same mixture with Gather + MatMul, which exports.
            kwargs["experts_implementation"] = "batched_mm"
        return kwargs
    # GPT-2, GPT-J and CodeGen share GPT-2's config vocabulary; the last two add partial rotary.
    gpt_style = {"n_layer": _LAYERS, "n_embd": _HIDDEN, "n_head": _HEADS, "n_positions": _POSITIONS, "vocab_size": _VOCAB}
    if arch == "gpt2":
        return gpt_style
    if arch == "gptj":
        return {**gpt_style, "rotary_dim": _ROTARY_DIM}
    if arch == "codegen":
        return {**gpt_style, "n_ctx": _POSITIONS, "rotary_dim": _ROTARY_DIM}
    if arch == "falcon":
        return {
            "hidden_size": _HIDDEN,
            "num_hidden_layers": _LAYERS,
            "num_attention_heads": _HEADS,
            "max_position_embeddings": _POSITIONS,
            "vocab_size": _VOCAB,
        }
    if arch == "mpt":
        return {"d_model": _HIDDEN, "n_layers": _LAYERS, "n_heads": _HEADS, "max_seq_len": _POSITIONS, "vocab_size": _VOCAB}
    raise _unknown(arch)


def _unknown(arch: object) -> ExportError:
    return ExportError(
        f"unknown tiny architecture {arch!r}",
        f"choose one of: {', '.join(TINY_ARCHITECTURES)}",
    )


def tiny_config(arch: str) -> PretrainedConfig:
    """The transformers config of the tiny ``arch`` model (see the module docstring for sizes).

    Raises :class:`~qeff.errors.ExportError` for a name not in :data:`TINY_ARCHITECTURES`.
    """
    if arch not in TINY_ARCHITECTURES:
        raise _unknown(arch)
    _, transformers = require_torch()
    kwargs = _config_kwargs(arch)
    kwargs.update(_SPECIAL_TOKENS)
    return transformers.AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(arch: str, seed: int = 0, attn_implementation: str = "eager") -> PreTrainedModel:
    """Build the tiny ``arch`` causal LM in float32, eval mode, every parameter drawn from ``seed``.

    The same ``(arch, seed)`` always gives bit-identical weights, so a test can rebuild the model
    that an earlier export came from instead of keeping it around.
    """
    torch, transformers = require_torch()
    config = tiny_config(arch)
    try:
        # HF initialisation draws from the global RNG; fork it so building a model does not shift
        # the caller's random stream (every parameter is overwritten from `seed` below anyway).
        with torch.random.fork_rng(devices=[]):
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, dtype=torch.float32
            )
    except (ValueError, ImportError) as exc:
        # transformers rejects an unknown or unavailable attention implementation here.
        raise ExportError(
            f"cannot build tiny {arch} with attn_implementation={attn_implementation!r}: "
            f"{exception_reason(exc, first_sentence=True)}",
            "attn_implementation='eager' works for every tiny architecture",
        ) from exc
    randomize_parameters(model, seed)
    model.eval()
    logger.debug("built tiny %s (%d parameters, seed %d)", arch, model.num_parameters(), seed)
    return model
