#!/usr/bin/env python
"""Prompt-lookup speculative decoding on the reference model, against plain greedy decoding in
the same run (README, "Decode-time passes").

Exports the reference model, rewrites it twice — ``kv`` (plain decoding) and ``kv,spec:k=K``
(the speculative target) — and generates greedily from a repetitive prompt: code a model
continues by copying from its context (a class body written twice, the second time cut short).
Prints, for plain decoding and for each K: target calls per generated token, acceptance rate,
decode tokens/s and its ratio to plain decoding, and checks the tokens are identical.

    python bench/bench_speculative.py [--k 3,7] [--new-tokens 96] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

PROMPT = '''class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return f"Point({self.x}, {self.y})"

    def __eq__(self, other):
        return self.x == other.x and self.y == other.y

class Point:
    def __init__(self, x, y):
        self.x = x
'''
CTX_LEN = 256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="3,7", help="proposals per step, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (the median is reported)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from qeff.evaluation.text import find_tokenizer, load_tokenizer
    from qeff.frontend import export_model
    from qeff.optimizer import optimize
    from qeff.reference import CHECKPOINT
    from qeff.runtime import OrtSession, generate
    from qeff.runtime.speculative import PromptLookup

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ref = export_model(source=CHECKPOINT, output=work / "reference.onnx", progress=False).path
        prompt = load_tokenizer(find_tokenizer(ref)).encode(PROMPT).ids
        ks = [int(k) for k in args.k.split(",")]
        rows = []

        def run(path, label, proposer=None):
            speeds, result = [], None
            for _ in range(args.repeats):
                result = generate(OrtSession(path), [prompt], args.new_tokens, prefill_len=32, speculative=proposer)
                speeds.append(result.stats.decode_tokens_per_s)
            stats = result.stats
            rows.append((label, stats.target_calls / max(stats.decode_tokens, 1), stats.acceptance_rate,
                         statistics.median(speeds), result.tokens[0]))

        run(optimize(ref, f"kv:ctx_len={CTX_LEN}", work / "kv.onnx").output, "plain decoding")
        for k in ks:
            target = optimize(ref, f"kv:ctx_len={CTX_LEN},spec:k={k}", work / f"spec{k}.onnx").output
            run(target, f"prompt lookup, K={k}", PromptLookup(k=k))

    base = rows[0][3]
    print(f"reference model, prompt of {len(prompt)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| decoding | target calls / token | acceptance | decode tokens/s | vs plain |")
    print("|---|---:|---:|---:|---:|")
    for label, calls, acceptance, speed, _ in rows:
        print(f"| {label} | {calls:.2f} | {acceptance:.0%} | {speed:,.0f} | {speed / base:.2f}x |")
    same = all(r[4] == rows[0][4] for r in rows)
    print(f"tokens identical to plain decoding: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
