"""Complex-number RoPE in real arithmetic, for the export.

Llama-4 rotates Q and K with complex numbers: its rotary embedding returns ``polar(1, θ)`` and
the rotation views each (even, odd) pair of a head as one complex number and multiplies.
Neither exporter lowers complex tensors (``aten::polar``, ``view_as_complex``). During the
export the rotary embedding returns ``(cos θ, sin θ)`` on a last axis of 2 instead, and the
rotation multiplies the pairs in real arithmetic — the products and sums of the complex
multiply, ``(a + ib)(c + is) = (ac - bs) + i(as + bc)``, so the graph computes what the model
computes. The model's own functions are restored afterwards.
"""

from __future__ import annotations

__all__ = ["real_valued_rope"]

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_LLAMA4 = "transformers.models.llama4.modeling_llama4"


def _rotary_forward(module: Any):
    def forward(self, x, position_ids):
        import torch

        angles = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * self.attention_scaling

    decorate = getattr(module, "dynamic_rope_update", None)  # dynamic RoPE types update inv_freq first
    return decorate(forward) if decorate is not None else forward


def _rotate(x, cos_sin):
    """x [b, S, h, d] rotated by cos_sin [b, S, d/2, 2], pairs (x[2i], x[2i+1]) as complex numbers."""
    import torch

    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos_sin[:, :, None, :, 0], cos_sin[:, :, None, :, 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(3).type_as(x)


def _apply_rotary_emb(xq, xk, cos_sin):
    return _rotate(xq, cos_sin), _rotate(xk, cos_sin)


@contextlib.contextmanager
def real_valued_rope(model: Any) -> Iterator[None]:
    """Within the block, a Llama-4 text model computes RoPE without complex tensors."""
    module = sys.modules.get(_LLAMA4)
    rotary = getattr(module, "Llama4TextRotaryEmbedding", None)
    if rotary is None or not any(isinstance(m, rotary) for m in model.modules()):
        yield
        return
    logger.info("exporting Llama-4's complex-number RoPE in real arithmetic")
    saved = rotary.forward, module.apply_rotary_emb
    rotary.forward, module.apply_rotary_emb = _rotary_forward(module), _apply_rotary_emb
    try:
        yield
    finally:
        rotary.forward, module.apply_rotary_emb = saved
