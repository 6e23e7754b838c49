"""``qeff demo``: the whole flow on the reference model, with real text, in about a minute.

1. export the reference model (a small Llama trained on Python's documentation, shipped with
   the package), checked against torch in onnxruntime;
2. run the pipeline (default ``cleanup,fold,kv,fixed,fp16clip,mxfp6``) with ``--verify``: the
   KV model by greedy generation against the export, and, since the pipeline is lossy, on the
   held-out text (perplexity change and top-1 agreement, within the default limits);
3. the same pipeline without its MX passes (what fp16 alone costs);
4. greedy continuations of a prompt, decoded: the fp32 export recomputing the sequence, the
   fp16 model and the full pipeline, both in fp16 simulation through ``OrtSession`` +
   ``generate`` (chunked prefill, decode with the cache), each with its agreement with fp32;
5. a quality table on the held-out split (``qeff eval``): perplexity, its change, top-1
   agreement and KL divergence of each model against the fp32 export;
6. a dry-run compile: the compiler's files and its exact command.
"""

from __future__ import annotations

__all__ = ["run_reference_demo", "PROMPTS", "NEW_TOKENS"]

import contextlib
import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPTS = ("The for statement is used to", "An exception is raised when")
NEW_TOKENS = 24
CHUNK = 4
DEFAULT_CTX_LEN = 128


@dataclasses.dataclass
class Continuation:
    label: str
    tokens: list[list[int]]
    texts: list[str]
    agree: int = 0
    total: int = 0


def _without_lossy(specs, pipeline) -> tuple[list, list] | None:
    """(specs, passes) of the pipeline with its lossy (MX) passes left out; None when none was,
    or none is left. Passes keep no state between runs, so the built ones serve again."""
    kept = [(spec, p) for spec, p in zip(specs, pipeline) if not p.lossy]
    if not kept or len(kept) == len(specs):
        return None
    return [spec for spec, _ in kept], [p for _, p in kept]


def _text(specs) -> str:
    return ",".join(s.name + (":" + ",".join(f"{k}={v}" for k, v in s.options.items()) if s.options else "")
                    for s in specs)


def run_reference_demo(*, exporter: str = "torchscript", workdir: Path = Path("qeff-demo"),
                       passes: str = "cleanup,fold,kv,fixed,fp16clip,mxfp6", ctx_len: int | None = None,
                       console: Console | None = None) -> dict:
    """Run the demo; returns ``{"export", "optimize", "fp16", "continuations", "quality", "compile"}``."""
    from qeff.demo import _dry_run_compile, demo_pipeline
    from qeff.evaluation import evaluate
    from qeff.evaluation.text import load_tokenizer
    from qeff.frontend import export_model
    from qeff.optimizer import optimize
    from qeff.reference import CHECKPOINT, TOKENIZER
    from qeff.verify import describe

    console = console or Console()
    workdir = Path(workdir)
    specs, pipeline, ctx_len = demo_pipeline(passes, ctx_len, DEFAULT_CTX_LEN)
    has_kv = any(spec.name == "kv" for spec in specs)
    kept = _without_lossy(specs, pipeline)
    plain = _text(kept[0]) if kept else None
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    console.rule(f"[bold]qeff demo[/] — the reference model, passes {passes}")
    exported = export_model(source=CHECKPOINT, exporter=exporter, output=workdir / "reference.onnx", progress=True)
    console.print(f"1. exported the reference model ({exported.num_parameters:,} parameters, a Llama trained on "
                  f"Python's documentation) with {exported.exporter} to {exported.path} — onnxruntime vs torch max "
                  f"abs diff {exported.max_abs_diff:.2e}")

    full = optimize(exported.path, pipeline, workdir / "reference.full.onnx", verify=True,
                    report_path=workdir / "report.json")
    steps = "; ".join(f"{r.name} {r.nodes_before}→{r.nodes_after} nodes" for r in full.report.passes)
    console.print(f"2. ran {passes} → {full.output} ({steps}; the whole report: report.json)")
    console.print(f"   verified: {describe(full.report.verification)}", markup=False, highlight=False)
    fp16 = None
    if plain is not None:
        fp16 = optimize(exported.path, kept[1], workdir / "reference.fp16.onnx", verify=True)
        console.print(f"3. ran {plain} (no MX) → {fp16.output}; verified: {describe(fp16.report.verification)}",
                      markup=False, highlight=False)

    tokenizer = load_tokenizer(TOKENIZER)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    continuations = []
    if has_kv:
        continuations = _continuations(exported.path, [(fp16, "fp16 model"), (full, "full pipeline")],
                                       prompts, tokenizer, ctx_len)
        _print_continuations(console, continuations)

    rows = [("fp32 export", exported.path, None)]
    rows += [(label, r.output, r.fp16_keep is not None)
             for r, label in ((fp16, "fp16 model"), (full, "full pipeline")) if r is not None]
    quality = [(label, evaluate(path, reference=exported.path, fp16_sim=bool(sim), progress=True))
               for label, path, sim in rows]
    _print_quality(console, quality)
    console.print(f"   fp16 model: {plain or '—'}; full pipeline: {passes}. Perplexity is exp(mean NLL) of each "
                  "held-out token given at least 32 before it; top-1 agree: the model's most likely next token is "
                  "the fp32 export's; KL: KL(fp32 ‖ model) per token, in nats.")

    compiled = _dry_run_compile(console, full.output, workdir / "compile", step=6)
    console.print(f"files in {workdir}: reference.onnx, {full.output.name}"
                  + (f", {fp16.output.name}" if fp16 else "") + f", report.json, compile/ — done in "
                  f"{time.perf_counter() - start:.1f} s")
    return {"export": exported, "optimize": full, "fp16": fp16, "continuations": continuations,
            "quality": quality, "compile": compiled}


def _continuations(reference: Path, models, prompts, tokenizer, ctx_len: int) -> list[Continuation]:
    """Greedy continuations: the fp32 export recomputing the sequence, then each rewritten model
    through OrtSession + generate (in fp16 simulation when fp16clip ran)."""
    from qeff.runtime import OrtSession, generate
    from qeff.verify import greedy_reference

    ref_tokens, _ = greedy_reference(reference, prompts, NEW_TOKENS)
    out = [Continuation("fp32 export", ref_tokens, [tokenizer.decode(t) for t in ref_tokens])]
    for result, label in models:
        if result is None:
            continue
        with contextlib.ExitStack() as stack:
            source = result.output
            if result.fp16_keep is not None:
                from qeff.passes.fp16.simulation import simulation_beside

                source = stack.enter_context(simulation_beside(result.output, result.fp16_keep))
                label += " (fp16 simulation)"
            session = stack.enter_context(OrtSession(source, ctx_len=ctx_len))
            got = generate(session, prompts, NEW_TOKENS, prefill_len=CHUNK).tokens
        agree = sum(a == b for g, r in zip(got, ref_tokens) for a, b in zip(g, r))
        out.append(Continuation(label, got, [tokenizer.decode(t) for t in got], agree,
                                sum(len(r) for r in ref_tokens)))
    return out


def _print_continuations(console: Console, rows: list[Continuation]) -> None:
    console.print(f"4. greedy continuations, {NEW_TOKENS} new tokens (rewritten models: OrtSession + generate, "
                  f"prefill in chunks of {CHUNK}, decode with the cache)")
    for i, prompt in enumerate(PROMPTS):
        table = Table(title=f"prompt: {prompt!r}", title_justify="left", show_lines=True)
        table.add_column("model")
        table.add_column("continuation")
        table.add_column("tokens = fp32", justify="right")
        for row in rows:
            same = str(sum(a == b for a, b in zip(row.tokens[i], rows[0].tokens[i]))) if row.total else "—"
            # Line breaks shown as ↵, so each continuation reads as one line of text.
            table.add_row(row.label, row.texts[i].replace("\n", "↵"), same)
        console.print(table)
    for row in rows[1:]:
        console.print(f"   {row.label}: {row.agree}/{row.total} tokens equal to the fp32 export's")


def _print_quality(console: Console, quality) -> None:
    first = quality[0][1]
    table = Table(title=f"5. quality on the held-out split ({first.tokens:,} tokens; qeff eval)", title_justify="left")
    for column in ("model", "perplexity", "Δ", "top-1 agree", "KL mean"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, r in quality:
        table.add_row(label + (" (fp16 simulation)" if r.fp16_sim else ""), f"{r.perplexity:.3f}",
                      f"{r.perplexity_change:+.2%}", f"{r.top1_agreement:.2%}", f"{r.kl_mean:.1e}")
    console.print(table)
