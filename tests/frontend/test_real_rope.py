"""Llama-4's complex-number RoPE, rewritten in real arithmetic for the export, computes what
transformers' own complex functions compute, and the model gets its functions back after."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _model():
    config = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, intermediate_size=32,
                                           intermediate_size_mlp=64, num_local_experts=2)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_rotation_matches_the_complex_one():
    from transformers.models.llama4 import modeling_llama4 as m

    from qeff.frontend.real_rope import real_valued_rope

    model = _model()
    rotary = model.model.rotary_emb
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 16, generator=generator)
    k = torch.randn(2, 5, 1, 16, generator=generator)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    want = m.apply_rotary_emb(x, k, rotary(x, positions))
    with real_valued_rope(model):
        cos_sin = rotary(x, positions)
        assert not cos_sin.is_complex()
        got = m.apply_rotary_emb(x, k, cos_sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rotary(x, positions).is_complex() and m.apply_rotary_emb(x, k, rotary(x, positions))[0].shape == x.shape
