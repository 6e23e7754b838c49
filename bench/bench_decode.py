#!/usr/bin/env python
"""Decode benchmark: OrtSession + qeff.runtime.generate against Hugging Face generate.

A Llama of hidden 256, 4 layers and a 32000-token vocabulary with random weights is built from
its transformers config, exported plainly to ONNX and rewritten with ``kv:ctx_len=512``. Both
sides then generate greedily, with a cache, from the same prompt, in the same run:

- Hugging Face ``generate`` (PyTorch, ``use_cache=True``): decode tokens/s is measured as
  (N − 1) / (t(N new tokens) − t(1 new token)), so the prefill is left out;
- ``OrtSession`` + ``generate``: its own decode tokens/s (decode steps only).

It prints both, their ratio (ours / Hugging Face; the target is >= 1.0), whether the tokens agree,
and the KV-cache bytes copied between onnxruntime and NumPy per decode step (the target is 0:
the cache stays in bound OrtValues). Best of ``--repeat`` for each side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(folder: Path, layers: int, hidden: int, vocab: int, ctx: int, seed: int):
    import torch
    import transformers

    from qeff.frontend.export import export_causal_lm
    from qeff.frontend.randomize import randomize_parameters
    from qeff.optimizer import optimize

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                                      vocab_size=vocab, max_position_embeddings=ctx)
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlamaForCausalLM(config).eval()
    randomize_parameters(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    plain = export_causal_lm(model, folder / "llama.onnx", external_data=False, progress=False)
    kv = optimize(plain, f"kv:ctx_len={ctx}", output=folder / "llama.kv.onnx").output
    return model, kv


def hf_decode_rate(model, prompt: list[int], new: int, repeat: int) -> tuple[float, list[int]]:
    import torch

    ids = torch.tensor([prompt])

    def timed(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True)
        return time.perf_counter() - start, out[0, len(prompt):].tolist()

    best = float("inf")
    tokens: list[int] = []
    for _ in range(repeat):
        t1, _ = timed(1)
        tn, tokens = timed(new)
        best = min(best, (tn - t1) / (new - 1))
    return 1.0 / best, tokens


def ours_decode_rate(kv_model: Path, prompt: list[int], new: int, repeat: int, ctx: int) -> tuple[float, list[int], float]:
    from qeff.runtime import OrtSession, generate

    session = OrtSession(kv_model, ctx_len=ctx)
    best, tokens, copied_per_step = 0.0, [], 0.0
    for _ in range(repeat):
        before = session.kv_bytes_copied
        result = generate(session, [prompt], new, prefill_len=len(prompt))
        best = max(best, result.stats.decode_tokens_per_s)
        tokens = result.tokens[0]
        copied_per_step = (session.kv_bytes_copied - before) / max(1, result.stats.decode_tokens)
    return best, tokens, copied_per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ctx-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    prompt = np.random.default_rng(0).integers(2, args.vocab, args.prompt_len).tolist()
    with tempfile.TemporaryDirectory(prefix="qeff-bench-decode-") as tmp:
        model, kv = build(Path(tmp), args.layers, args.hidden, args.vocab, args.ctx_len, seed=0)
        ours, our_tokens, copied = ours_decode_rate(kv, prompt, args.new_tokens, args.repeat, args.ctx_len)
        hf, hf_tokens = hf_decode_rate(model, prompt, args.new_tokens, args.repeat)
    agree = sum(a == b for a, b in zip(our_tokens, hf_tokens))
    results = {"ours_decode_tokens_per_s": ours, "hf_decode_tokens_per_s": hf, "ratio": ours / hf,
               "tokens_agree": f"{agree}/{len(hf_tokens)}", "kv_bytes_copied_per_step": copied,
               "config": vars(args) | {"json": None}, "targets": {"ratio_min": 1.0, "kv_bytes_per_step": 0}}
    results["pass"] = results["ratio"] >= 1.0 and copied == 0
    print(f"decode: OrtSession + generate {ours:,.1f} tokens/s, Hugging Face generate {hf:,.1f} tokens/s, "
          f"ratio {ours / hf:.2f} (target >= 1.0)")
    print(f"greedy tokens agree {agree}/{len(hf_tokens)}; KV bytes copied per decode step: {copied:g} (target 0)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
