"""Deterministic randomisation of every parameter of a model.

Hugging Face initialisation is a poor test input for a graph compiler: biases start at zero and
norm weights at one, and the ONNX exporters fold exactly those values away (zero biases are
dropped, identical norm weights are deduplicated into one initializer). A pass tested on such a
graph never sees the structure a real checkpoint produces. Here every parameter gets fresh noise
drawn from one seeded generator, scaled so activations stay around unit variance and the logits
of a tiny model are neither flat nor saturated.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from ._deps import require_torch

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["randomize_parameters"]

# Spread of norm weights around their neutral value: enough that no two norms are equal (so the
# exporter cannot deduplicate them) while staying close to the identity scale.
_NORM_STD = 0.1
_BIAS_STD = 0.1


def _is_norm(module: torch.nn.Module) -> bool:
    # LayerNorm, LlamaRMSNorm, GemmaRMSNorm, ...: transformers has no common base class for its
    # norms, but they all say so in their name.
    return "norm" in type(module).__name__.lower()


def _weight_std(module: torch.nn.Module, param: torch.Tensor) -> float:
    """Standard deviation of a weight so that ``x @ W`` keeps roughly unit variance."""
    torch, transformers = require_torch()
    if isinstance(module, torch.nn.Embedding):
        # Embedding rows are also the tied lm_head: 1/sqrt(hidden) keeps the logits O(1).
        return 1.0 / math.sqrt(param.shape[-1])
    if isinstance(module, transformers.pytorch_utils.Conv1D):
        fan_in = param.shape[0]  # GPT-2's Conv1D stores the weight as [in, out]
    else:
        fan_in = param.shape[-1]  # nn.Linear [out, in]; stacked experts [experts, out, in]
    return 1.0 / math.sqrt(fan_in)


def randomize_parameters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter of ``model`` in place with noise drawn from ``seed``; return it.

    Parameters are visited in ``named_parameters()`` order, which lists a tied parameter once,
    so tied weights stay tied and the result depends only on the model structure and the seed.

    - norm weights: ``1 + N(0, 0.1)``; when the norm was initialised to all zeros (Gemma stores
      its RMSNorm scale as an offset, computing ``x * (1 + w)``), ``N(0, 0.1)`` instead;
    - other 1-D parameters (biases, norm biases): ``N(0, 0.1)``;
    - matrices and stacked expert weights: ``N(0, 1/fan_in)``; embeddings ``N(0, 1/hidden)``.
    """
    torch, _ = require_torch()
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() <= 1:
                if _is_norm(owner) and leaf == "weight":
                    centre = 0.0 if bool((param == 0).all()) else 1.0
                    values = centre + _NORM_STD * noise
                else:
                    values = _BIAS_STD * noise
            else:
                values = _weight_std(owner, param) * noise
            param.copy_(values.to(dtype=param.dtype, device=param.device))
    logger.debug("randomized %s with seed %d", type(model).__name__, seed)
    return model
