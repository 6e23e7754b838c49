"""Tiny configs and parameter randomization: sizes, determinism, no HF-init leftovers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qeff.errors import ExportError  # noqa: E402
from qeff.frontend import TINY_ARCHITECTURES, build_tiny_model, randomize_parameters, tiny_config  # noqa: E402

KV_HEADS = {"llama": 2, "mistral": 2, "phi3": 2, "qwen2": 2, "starcoder2": 2, "mixtral": 2, "gemma": 1}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_config_sizes(arch):
    config = tiny_config(arch)
    assert config.model_type == arch
    assert config.num_hidden_layers == 2
    assert config.hidden_size == 64
    assert config.num_attention_heads == 4
    assert config.vocab_size == 512
    positions = getattr(config, "max_position_embeddings", None) or config.max_seq_len
    assert positions >= 256
    if arch in KV_HEADS:
        assert config.num_key_value_heads == KV_HEADS[arch]
        assert (getattr(config, "head_dim", None) or 16) == 16


def test_mixtral_config_uses_exportable_experts():
    config = tiny_config("mixtral")
    assert config.num_local_experts == 4
    assert config.num_experts_per_tok == 2
    assert build_tiny_model("mixtral").config._experts_implementation == "batched_mm"


def test_unknown_architecture_names_the_valid_ones():
    with pytest.raises(ExportError) as info:
        tiny_config("bloom")
    message = str(info.value)
    assert "bloom" in message and "llama" in message and "gemma" in message
    assert "\n" not in message
    with pytest.raises(ExportError):
        build_tiny_model("bloom")


def test_unknown_attention_implementation_is_an_export_error():
    with pytest.raises(ExportError, match="attn_implementation"):
        build_tiny_model("llama", attn_implementation="no-such-attention")


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_same_seed_same_weights_different_seed_different_weights():
    a = _weights(build_tiny_model("llama", seed=3))
    b = _weights(build_tiny_model("llama", seed=3))
    c = _weights(build_tiny_model("llama", seed=4))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name


def test_randomize_in_place_is_deterministic_and_keeps_ties():
    model = build_tiny_model("gpt2", seed=0)
    randomize_parameters(model, 11)
    first = _weights(model)
    randomize_parameters(model, 11)
    assert all(torch.equal(first[n], p) for n, p in model.named_parameters())
    # GPT-2 ties lm_head to the token embedding: still one tensor after randomizing.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_no_parameter_keeps_its_hf_init_pattern(arch):
    model = build_tiny_model(arch, seed=0)
    seen = []
    for name, param in model.named_parameters():
        values = param.detach()
        assert values.dtype == torch.float32, name
        assert not torch.all(values == 1), f"{name} is all ones"
        assert not torch.all(values == 0), f"{name} is all zeros"
        assert values.numel() == 1 or float(values.std()) > 0, f"{name} is constant"
        for other_name, other in seen:
            if other.shape == values.shape:
                assert not torch.equal(other, values), f"{name} equals {other_name}"
        seen.append((name, values))
    assert not model.training


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma", "mpt"])
def test_logits_are_not_degenerate(arch):
    model = build_tiny_model(arch, seed=0)
    input_ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.2 < float(logits.std()) < 20
    assert logits.argmax(-1).unique().numel() >= 4
