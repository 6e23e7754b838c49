"""kv beyond the twelve tiny architectures, token for token against Hugging Face generate on a
right-padded batch of two prompts (10 and 3 tokens, prefill in chunks of 4) that cross every
window: the MoE families (experts exported as for Mixtral), SmolLM3 (layers without RoPE) and
Gemma-3 text (a local sliding-window layer next to a global one, read from the masks). The
exporters alternate over the cases; each pair was also run with the other exporter."""

from __future__ import annotations

import pytest

from qeff.optimizer import optimize
from tests.kv_drive import assert_generates_like_hf

pytestmark = pytest.mark.slow
CTX = 32
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)


def _config(arch: str):
    import transformers as t

    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2, head_dim=16)
    if arch == "olmoe":
        return t.OlmoeConfig(**COMMON, intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    if arch == "granitemoe":
        return t.GraniteMoeConfig(**COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if arch == "smollm3":
        return t.SmolLM3Config(**COMMON, intermediate_size=64, no_rope_layer_interval=2, pad_token_id=0)
    if arch == "gemma3_text":
        return t.Gemma3TextConfig(**COMMON, intermediate_size=64, head_dim=16, sliding_window=4,
                                  query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


CASES = [("qwen3_moe", "dynamo"), ("olmoe", "torchscript"), ("granitemoe", "dynamo"), ("qwen2_moe", "torchscript"),
         ("smollm3", "dynamo"), ("gemma3_text", "torchscript")]
VISIBILITY = {"gemma3_text": ["sliding window 4", "causal"]}


@pytest.mark.parametrize("arch,exporter", CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_matches_hugging_face(tmp_path, arch, exporter):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qeff.frontend import export_causal_lm, randomize_parameters

    model = transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager").eval()
    randomize_parameters(model, 0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    path = export_causal_lm(model, tmp_path / f"{arch}.onnx", exporter=exporter, external_data=False, progress=False)
    result = optimize(path, f"kv:ctx_len={CTX}", tmp_path / "kv.onnx")
    assert result.manifest.kv.visibility == VISIBILITY.get(arch, ["causal", "causal"])
    assert_generates_like_hf(model, result.output, CTX)
