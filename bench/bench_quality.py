#!/usr/bin/env python
"""Accuracy of every lossy pass, measured on the reference model (README, "Accuracy").

Exports the reference model (``qeff export --reference``) once, runs each pass combination with
``qeff.optimize``, and evaluates the result with ``qeff.evaluation.evaluate`` against the fp32
export on the held-out split (5.5 k tokens, windows of 128 with 32 of context): perplexity,
its change, top-1 agreement with fp32, and mean/max KL(fp32 ‖ model) per token. Rows with
``fp16clip`` run in fp16 simulation. KV rows are driven as deployed (chunked prefill, decode).

    python bench/bench_quality.py [--json results.json] [--workdir DIR]

It prints the README's table (markdown). No target: it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# (label, passes, fp16 simulation)
VARIANTS: list[tuple[str, str | None, bool]] = [
    ("fp32 export", None, False),
    ("fp16 simulation (fp16clip)", "fp16clip", True),
    ("mxfp8", "mxfp8", False),
    ("mxfp6 (scale ocp, ties to even)", "mxfp6", False),
    ("mxfp6 (scale ocp, ties away)", "mxfp6:rounding=nearest", False),
    ("mxfp6 (scale ocp_plus1, ties to even)", "mxfp6:scale=ocp_plus1", False),
    ("mxfp6 (scale ocp_plus1, ties away)", "mxfp6:scale=ocp_plus1,rounding=nearest", False),
    ("mxfp4", "mxfp4", False),
    ("mxint8 weights", "mxint8", False),
    ("kv", "kv", False),
    ("kv + mxint8kv", "kv,mxint8kv", False),
    ("kv + mxfp6", "kv,mxfp6", False),
    ("kv + mxfp6 + mxint8kv", "kv,mxfp6,mxint8kv", False),
    ("kv,fixed,fp16clip (fp16 sim.)", "kv,fixed,fp16clip", True),
    ("kv,fixed,fp16clip,mxfp6 (fp16 sim.)", "kv,fixed,fp16clip,mxfp6", True),
    ("kv,fixed,fp16clip,mxfp6,mxint8kv (fp16 sim.)", "kv,fixed,fp16clip,mxfp6,mxint8kv", True),
]
CTX_LEN = 128


def measure(workdir: Path) -> list[dict]:
    from qeff.evaluation import evaluate
    from qeff.frontend import export_model
    from qeff.optimizer import optimize
    from qeff.reference import CHECKPOINT

    ref = export_model(source=CHECKPOINT, output=workdir / "reference.onnx", progress=False).path
    rows = []
    for i, (label, passes, fp16) in enumerate(VARIANTS):
        model = ref
        if passes is not None:
            model = workdir / f"v{i}.onnx"
            optimize(ref, passes, model, overrides={"ctx_len": str(CTX_LEN)} if "kv" in passes else None)
        started = time.perf_counter()
        r = evaluate(model, reference=ref, fp16_sim=fp16)
        rows.append({"variant": label, "passes": passes or "", "fp16_sim": fp16, "kind": r.kind,
                     "perplexity": r.perplexity, "perplexity_change": r.perplexity_change,
                     "top1_accuracy": r.top1_accuracy, "top1_agreement": r.top1_agreement,
                     "kl_mean": r.kl_mean, "kl_max": r.kl_max, "tokens": r.tokens,
                     "seconds": time.perf_counter() - started})
        print(f"{label}: perplexity {r.perplexity:.3f} ({r.perplexity_change:+.2%}), top-1 agreement "
              f"{r.top1_agreement:.2%}, KL mean {r.kl_mean:.2e} max {r.kl_max:.2e}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | run as | perplexity | Δ perplexity | top-1 agreement | KL mean | KL max |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        how = ("KV: prefill + decode" if r["kind"] == "kv" else "full sequence") + (", fp16 sim." if r["fp16_sim"] else "")
        lines.append(f"| {r['variant']} | {how} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
                     f"{r['top1_agreement']:.2%} | {r['kl_mean']:.1e} | {r['kl_max']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qeff-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = measure(workdir)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
