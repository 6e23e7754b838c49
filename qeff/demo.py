"""``qeff demo``: the whole flow on an embedded tiny model, end to end, on one screen.

1. build a tiny Hugging Face model with random weights (no hub needed) and export it plainly
   (TorchScript by default: its graphs carry the run-time shape arithmetic ``fold`` removes),
   checked against torch in onnxruntime;
2. run the passes (default ``cleanup,fold,kv,fixed,fp16clip,mxfp6``) and print what changed;
3. ``--verify``: for ``kv``, greedy generation against the original graph; with ``fp16clip`` in
   fp16 simulation; with an MX pass reported rather than required to agree;
4. when the pipeline has ``kv``: generate on the CPU with ``OrtSession`` + ``generate`` (in fp16
   simulation when ``fp16clip`` ran, as the card computes), next to the original fp32 export
   recomputing the whole sequence, with the agreement and the performance stats;
5. a dry-run compile: the compiler's files and its exact command.
"""

from __future__ import annotations

__all__ = ["run_demo", "DemoGeneration", "demo_pipeline"]

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# The generation shown in step 5: two prompts of different lengths, so the batch is right-padded
# and the longer one spans two prefill chunks.
_PROMPT_LENGTHS = (6, 3)
_NEW_TOKENS = 12
_CHUNK = 4
DEFAULT_CTX_LEN = 64


@dataclasses.dataclass
class DemoGeneration:
    """Step 4 of the demo: per prompt, the rewritten model's tokens (OrtSession + generate) and
    the original fp32 export's, with the generation stats."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    reference: list[list[int]]
    ctx_len: int
    chunk: int
    stats: Any
    fp16: bool
    kv_bytes_copied: int

    @property
    def matches(self) -> list[bool]:
        return [got == ref for got, ref in zip(self.tokens, self.reference)]

    @property
    def agreement(self) -> tuple[int, int]:
        same = sum(a == b for got, ref in zip(self.tokens, self.reference) for a, b in zip(got, ref))
        return same, sum(len(r) for r in self.reference)


def run_demo(
    *,
    arch: str = "llama",
    exporter: str = "torchscript",
    workdir: Path = Path("qeff-demo"),
    passes: str = "cleanup,fold,kv,fixed,fp16clip,mxfp6",
    ctx_len: int | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Run the demo; returns ``{"export", "optimize", "generation", "compile"}`` (generation None
    without kv; compile is the dry-run :class:`qeff.backend_aic.CompileResult`).

    ``ctx_len`` (default 64) goes to the passes that take it, like ``qeff-opt --ctx-len``; an
    explicit ``kv:ctx_len=…`` in ``passes`` wins.
    """
    from qeff.frontend import export_model
    from qeff.optimizer import optimize
    from qeff.verify import describe

    console = console or Console()
    workdir = Path(workdir)

    # Parse the pipeline before exporting, so a typo in --passes costs no export.
    specs, pipeline, ctx_len = demo_pipeline(passes, ctx_len, DEFAULT_CTX_LEN)
    has_kv = any(spec.name == "kv" for spec in specs)

    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    console.rule(f"[bold]qeff demo[/] — tiny {arch}, passes {passes}")
    exported = export_model(
        tiny=arch, exporter=exporter, output=workdir / f"tiny-{arch}.onnx", check=True, progress=True
    )
    console.print(
        f"1. exported tiny {arch} ({exported.num_parameters:,} random parameters) with "
        f"{exported.exporter} to {exported.path} — onnxruntime vs torch max abs diff "
        f"{exported.max_abs_diff:.2e}"
    )

    out = workdir / f"tiny-{arch}.{passes.replace(',', '.').replace(':', '-').replace('=', '')}.onnx"
    result = optimize(exported.path, pipeline, out, verify=True, report_path=workdir / "report.json")
    console.print(f"2. ran {passes} → {result.output}")
    console.print(result.report.rich_table())
    console.print(f"3. verified: {describe(result.report.verification)}", markup=False, highlight=False)

    generation = None
    if has_kv:
        generation = _generate(exported.path, result.output, result.manifest.ctx_len, seed, fp16_keep=result.fp16_keep)
        _print_generation(console, generation)

    compiled = _dry_run_compile(console, result.output, workdir / "compile")
    console.print(
        f"files: {result.output.name}, {result.manifest_path.name}, report.json, compile/ in {workdir} "
        f"— done in {time.perf_counter() - start:.1f} s"
    )
    lossy = any(p.lossy for p in pipeline) or result.fp16_keep is not None
    if generation is not None and not all(generation.matches) and not lossy:
        from qeff.errors import VerificationError

        bad = generation.matches.index(False)
        raise VerificationError(
            f"the KV model's greedy tokens differ from the original export's for prompt #{bad}",
            "see the generation table above; rerun with --debug and report it",
        )
    return {"export": exported, "optimize": result, "generation": generation, "compile": compiled}


def demo_pipeline(passes: str, ctx_len: int | None, default_ctx_len: int):
    """(specs, passes, ctx_len) of a demo's ``--passes``: ``ctx_len`` defaults to
    ``default_ctx_len`` when ``kv`` is in the pipeline. An explicit ``--ctx-len`` with a pipeline
    that does not use it is refused, as by qeff-opt."""
    from qeff.passes.infra.pipeline import build_passes, parse_pipeline

    specs = parse_pipeline(passes)
    if ctx_len is None and any(spec.name == "kv" for spec in specs):
        ctx_len = default_ctx_len
    return specs, build_passes(specs, {"ctx_len": str(ctx_len)} if ctx_len is not None else None), ctx_len


def _dry_run_compile(console: Console, model: Path, folder: Path, step: int = 5):
    """The last step: the compile files and the exact compiler command (no compiler is needed for it)."""
    from qeff.backend_aic import CompileOptions, compile_model
    from qeff.errors import QeffError

    try:
        compiled = compile_model(model, folder, CompileOptions(dry_run=True))
    except QeffError as e:  # e.g. a plain export whose symbols the compile cannot size
        console.print(f"{step}. dry-run compile skipped: {e}")
        return None
    console.print(f"{step}. dry-run compile: wrote {', '.join(sorted(compiled.files.values()))} to {folder}; "
                  "on a machine with the Cloud AI SDK the command is:")
    console.print(compiled.command_text, soft_wrap=True, markup=False, highlight=False)
    return compiled


def _generate(reference: Path, kv_model: Path, ctx_len: int | None, seed: int,
              fp16_keep: list[str] | None = None) -> DemoGeneration:
    """Greedy generation with OrtSession + generate (in fp16 simulation when ``fp16_keep`` is
    given), and with the original export recomputing everything."""
    from qeff.runtime import OrtSession, generate
    from qeff.verify import greedy_reference

    if fp16_keep is not None:
        from qeff.passes.fp16.simulation import simulate_fp16

        session = OrtSession(simulate_fp16(kv_model, keep_fp32=fp16_keep).SerializeToString(), ctx_len=ctx_len)
    else:
        session = OrtSession(kv_model, ctx_len=ctx_len)
    ctx = session.ctx_len or DEFAULT_CTX_LEN
    # A small --ctx-len shrinks the prompts and the number of new tokens instead of failing.
    lengths = [min(n, max(1, ctx // 2)) for n in _PROMPT_LENGTHS]
    new_tokens = max(1, min(_NEW_TOKENS, ctx - max(lengths) + 1))
    vocab = session.spec("logits").shape[-1]
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 100
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in lengths]
    # onnxruntime allocates on the first call of each input shape; one untimed run keeps that out
    # of the numbers of a model this small.
    generate(session, prompts, min(2, new_tokens), prefill_len=_CHUNK)
    got = generate(session, prompts, new_tokens, prefill_len=_CHUNK)
    ref_tokens, _ = greedy_reference(reference, prompts, new_tokens)
    return DemoGeneration(prompts=prompts, tokens=got.tokens, reference=ref_tokens, ctx_len=ctx, chunk=_CHUNK,
                          stats=got.stats, fp16=fp16_keep is not None, kv_bytes_copied=session.kv_bytes_copied)


def _print_generation(console: Console, g: DemoGeneration) -> None:
    new_tokens = len(g.reference[0])
    where = "in fp16 simulation, as the card computes" if g.fp16 else "in fp32"
    console.print(
        f"4. greedy generation on the CPU, {new_tokens} new tokens: OrtSession + generate on the rewritten "
        f"model {where} (ctx_len {g.ctx_len}, prefill in chunks of {g.chunk}, KV cache in bound OrtValues) "
        f"vs the original fp32 export recomputing the whole sequence at every step"
    )
    table = Table(title="generation", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    table.add_column("rewritten model")
    table.add_column("fp32 reference")
    table.add_column("match", justify="center")
    for i, (prompt, got, ref, same) in enumerate(zip(g.prompts, g.tokens, g.reference, g.matches)):
        table.add_row(str(i), " ".join(map(str, prompt)), " ".join(map(str, got)), " ".join(map(str, ref)),
                      "[green]✓[/]" if same else "[bold red]✗[/]")
    console.print(table)
    same, total = g.agreement
    console.print(f"tokens agree with the fp32 reference: {same}/{total} (random weights make near ties common, "
                  "so a quantized model may take another branch)")
    st = g.stats
    console.print(
        f"stats (onnxruntime CPU, this run, batch {len(g.prompts)}): TTFT {st.ttft_s * 1e3:.1f} ms · decode "
        f"{st.decode_tokens_per_s:,.0f} tokens/s · total {st.total_tokens_per_s:,.0f} tokens/s · end to end "
        f"{st.e2e_s * 1e3:.1f} ms · KV bytes copied {g.kv_bytes_copied}"
    )

