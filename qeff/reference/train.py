"""Reproduce the reference model: ``python -m qeff.reference.train [--seed 0] [-o FOLDER]``.

The text is the documentation every CPython ships (``pydoc_data.topics``: the language
reference's topics, ~460 KB of English). Topics are sorted by name; every tenth one (starting
with the fifth) is held out for evaluation and never seen by the tokenizer or the model.

1. a byte-level BPE tokenizer (``tokenizers``) with a 2,048-token vocabulary is trained on the
   training topics;
2. a Llama-family decoder (RoPE, RMSNorm, grouped-query attention, SwiGLU; 4 layers, hidden
   128, 4 query and 2 key/value heads; 1.3 M parameters) is trained from ``--seed`` with AdamW
   on random 128-token windows of the training tokens, on the CPU, for a few minutes;
3. the folder gets ``config.json``, ``model.safetensors`` (float32), ``tokenizer.json`` (with
   ``tokenizer_config.json``, so ``AutoTokenizer`` reads it), ``heldout.txt`` (the held-out
   split, kept so evaluation does not depend on the Python version's documentation) and
   ``training.json`` (the settings and the measured losses, with the held-out unigram baseline).

The same seed, torch build and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HELDOUT_EVERY = 10
HELDOUT_OFFSET = 4
VOCAB = 2048
EOS = "<|endoftext|>"
WINDOW = 128


def split_topics() -> tuple[str, str]:
    """(training text, held-out text) of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    train, heldout = [], []
    for i, name in enumerate(sorted(topics)):
        (heldout if i % HELDOUT_EVERY == HELDOUT_OFFSET else train).append(topics[name].strip() + "\n")
    return "\n".join(train), "\n".join(heldout)


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # One "document" per paragraph keeps the trainer's word counts close to the text's.
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def model_config(eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=eos_id, eos_token_id=eos_id, torch_dtype="float32")


def _nll(model, tokens, torch) -> float:
    """Mean next-token NLL over consecutive windows of ``tokens`` (the eval's own windows)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, WINDOW):
            chunk = tokens[start:start + WINDOW + 1]
            if len(chunk) < 2:
                break
            ids = torch.tensor(chunk[:-1])[None]
            logits = model(input_ids=ids).logits[0]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum")
            total, count = total + float(loss), count + len(chunk) - 1
    model.train()
    return total / count


def unigram_nll(train_ids: list[int], heldout_ids: list[int]) -> float:
    """Held-out NLL of token frequencies counted on the training split (add-one smoothed)."""
    import collections

    counts = collections.Counter(train_ids)
    total = len(train_ids) + VOCAB
    return -sum(math.log((counts[t] + 1) / total) for t in heldout_ids) / len(heldout_ids)


def train(output: Path, *, seed: int = 0, steps: int = 600, batch: int = 32, lr: float = 3e-3,
          threads: int = 2, log_every: int = 100) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    train_text, heldout_text = split_topics()
    tok = train_tokenizer(train_text)
    eos_id = tok.token_to_id(EOS)
    train_ids = tok.encode(train_text).ids
    heldout_ids = tok.encode(heldout_text).ids
    model = LlamaForCausalLM(model_config(eos_id))
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_text):,} / {len(heldout_text):,} characters, {len(train_ids):,} / {len(heldout_ids):,} "
          f"tokens (train / held out), {params:,} parameters")

    data = torch.tensor(train_ids)
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    log = []
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - WINDOW - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + WINDOW + 1] for s in starts.tolist()])
        out = model(input_ids=window[:, :-1], labels=window[:, :-1].contiguous())
        # transformers shifts the labels itself: the loss is over next tokens inside the window.
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            held = _nll(model, heldout_ids, torch)
            log.append({"step": step, "train_loss": round(out.loss.item(), 4), "heldout_nll": round(held, 4),
                        "seconds": round(time.perf_counter() - start, 1)})
            print(f"step {step}: train loss {out.loss.item():.3f}, held-out NLL {held:.3f} "
                  f"(perplexity {math.exp(held):.1f}), {time.perf_counter() - start:.0f} s", flush=True)

    output.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(output, safe_serialization=True)
    tok.save(str(output / "tokenizer.json"))
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
         "unk_token": EOS, "model_max_length": 512, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (output / "heldout.txt").write_text(heldout_text)
    held = _nll(model, heldout_ids, torch)
    unigram = unigram_nll(train_ids, heldout_ids)
    summary = {"seed": seed, "steps": steps, "batch": batch, "window": WINDOW, "lr": lr, "threads": threads,
               "parameters": params, "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
               "heldout_perplexity": round(math.exp(held), 3), "unigram_perplexity": round(math.exp(unigram), 3),
               "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1), "log": log}
    (output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out perplexity {summary['heldout_perplexity']} (unigram baseline "
          f"{summary['unigram_perplexity']}) → {output}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("checkpoint"))
    args = parser.parse_args(argv)
    train(args.output, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
