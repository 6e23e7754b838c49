"""Score-path transforms through kv, token for token against Hugging Face, on a right-padded
batch of two prompts that cross the window, with both exporters:

- Gemma-2: attention logit soft-capping (c · tanh(s / c) between the scaled scores and the
  mask), local layers with a sliding window next to global ones (read from each layer's mask),
  query_pre_attn_scalar, and the final logit soft-cap after the lm_head;
- gpt-oss: attention sinks (a learned logit per head joined to the scores before the Softmax
  and dropped after it), alternating sliding and full layers, and its MoE blocks."""

from __future__ import annotations

import pytest

from qeff.optimizer import optimize
from tests.kv_drive import assert_generates_like_hf

pytestmark = pytest.mark.slow
CTX = 32


def _model(arch: str):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qeff.frontend import randomize_parameters

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, sliding_window=4, max_position_embeddings=128)
    if arch == "gemma2":
        config = transformers.Gemma2Config(**common, intermediate_size=128, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    else:
        config = transformers.GptOssConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_parameters(model, 0)  # the sink logits too
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_matches_hugging_face(tmp_path, arch, exporter, monkeypatch, capsys):
    import json

    from qeff.frontend import export_causal_lm

    model = _model(arch)
    path = export_causal_lm(model, tmp_path / "g2.onnx", exporter=exporter, external_data=False, progress=False)
    out = tmp_path / "g2.kv.onnx"
    result = optimize(path, f"kv:ctx_len={CTX}", out)
    assert result.manifest.kv.visibility == ["sliding window 4", "causal"]  # layer 0 local, layer 1 global
    assert_generates_like_hf(model, out, CTX)
    assert json.loads(out.with_name("g2.kv.qeff.json").read_text())["kv"]["visibility"][0] == "sliding window 4"

    from rich.console import Console

    from qeff import cli
    from tests.cli.test_cli import invoke

    monkeypatch.setattr(cli, "console", Console(width=200))
    code, text, err = invoke(cli.opt_main, [path, "--explain", "kv"], monkeypatch, capsys)
    assert code == 0, err
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    cap, sinks = ("5", "no") if arch == "gemma2" else ("—", "yes")
    assert [row[7:10] for row in rows] == [["sliding window 4", cap, sinks], ["causal", cap, sinks]]
