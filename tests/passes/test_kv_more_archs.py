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
    if arch == "llama4_text":  # chunked attention (blocks of 4) on RoPE layers, a NoPE full layer, MoE, QK-norm
        return t.Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size=64, intermediate_size_mlp=128,
                                  num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=4, pad_token_id=0)
    if arch == "bloom":  # ALiBi computed from the attention mask, heads folded into the batch (bmm)
        return t.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)
    raise ValueError(arch)


CASES = [("qwen3_moe", "dynamo"), ("olmoe", "torchscript"), ("granitemoe", "dynamo"), ("qwen2_moe", "torchscript"),
         ("smollm3", "dynamo"), ("gemma3_text", "torchscript"), ("bloom", "dynamo"), ("bloom", "torchscript"),
         ("llama4_text", "dynamo")]
VISIBILITY = {"gemma3_text": ["sliding window 4", "causal"], "llama4_text": ["chunked attention 4"] * 3 + ["causal"]}


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


def _export(tmp_path, arch, exporter, **overrides):
    import transformers
    from qeff.frontend import export_causal_lm, randomize_parameters

    config = _config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_parameters(model, 0)
    return export_causal_lm(model, tmp_path / f"{arch}.onnx", exporter=exporter, external_data=False, progress=False)


def test_a_bias_that_is_not_alibi_is_refused_by_layer(tmp_path):
    """BLOOM's bias squared in layer 1: still a bias the probe can evaluate, no longer linear in
    the key position; kv refuses the layer and writes nothing."""
    import onnx_ir as ir

    from qeff.errors import UnsupportedGraphError
    from qeff.passes.kv.match import find_attention_sites

    pytest.importorskip("transformers")
    model = ir.load(_export(tmp_path / "src", "bloom", "torchscript"))
    site = next(s for s in find_attention_sites(model) if s.layer == 1)
    term = site.bias[0]
    user = next(u for u in term.uses() if u.node.op_type == "Add")
    square = ir.node("Mul", [term, term])
    model.graph.insert_before(user.node, square)
    user.node.replace_input_with(user.idx, square.outputs[0])
    out = tmp_path / "kv.onnx"
    with pytest.raises(UnsupportedGraphError, match=r"kv: layer 1: an additive score bias that is not ALiBi .*"
                                                     r"head 0, query 32, key 1"):
        optimize(model, f"kv:ctx_len={CTX}", out)
    assert not out.exists()


def test_positions_counted_by_the_step_are_refused_where_they_change(tmp_path):
    """Llama-4 scales its NoPE layer's queries by a function of arange(seq_len), not of
    position_ids. With floor_scale 4 the factor changes at position 3: the KV model would
    restart it every step, so kv refuses and says so; with the default (8192) it is 1 at every
    cache position and the model matches Hugging Face (test_matches_hugging_face)."""
    from qeff.errors import UnsupportedGraphError

    pytest.importorskip("transformers")
    source = _export(tmp_path / "src", "llama4_text", "dynamo", floor_scale=4)
    out = tmp_path / "kv.onnx"
    with pytest.raises(UnsupportedGraphError, match=r"from positions it counts from the start of each step .* "
                                                     r"changes at position 3.*ctx_len <= 3"):
        optimize(source, f"kv:ctx_len={CTX}", out)
    assert not out.exists()
