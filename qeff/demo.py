"""``qeff demo``: the whole flow on an embedded tiny model, end to end, on one screen.

1. build a tiny Hugging Face model with random weights (no hub needed) and export it plainly
   (TorchScript by default: its graphs carry the run-time shape arithmetic ``fold`` removes;
   the dynamo exporter already folds most of it);
2. check the export against torch in onnxruntime;
3. run the passes (default ``cleanup,fold,kv``) with ``--verify`` (original vs rewritten in
   onnxruntime; for ``kv`` that is greedy generation against the original graph);
4. print what changed;
5. when the pipeline has ``kv``: generate from a few seeded random prompts with the KV model
   (chunked prefill, then one token per step) next to the original export recomputing the
   whole sequence at every step, with the logits difference per step and the timings.
"""

from __future__ import annotations

__all__ = ["run_demo", "DemoGeneration"]

import dataclasses
import time
from pathlib import Path

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
    """Step 5 of the demo: per prompt, the KV model's tokens and the reference's.

    ``max_abs_per_step[s]`` is the largest logits difference at step ``s`` (0 = prefill) over
    the prompts whose tokens still agree up to that step; after a disagreement the two models
    continue from different sequences and are not compared.
    """

    prompts: list[list[int]]
    tokens: list[list[int]]
    reference: list[list[int]]
    max_abs_per_step: list[float]
    ctx_len: int
    chunk: int
    prefill_calls: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int

    @property
    def matches(self) -> list[bool]:
        return [got == ref for got, ref in zip(self.tokens, self.reference)]

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")


def run_demo(
    *,
    arch: str = "llama",
    exporter: str = "torchscript",
    workdir: Path = Path("qeff-demo"),
    passes: str = "cleanup,fold,kv",
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
    from qeff.passes import optimize
    from qeff.passes.pipeline import build_passes, parse_pipeline

    console = console or Console()
    workdir = Path(workdir)

    # Parse the pipeline before exporting, so a typo in --passes costs no export.
    specs = parse_pipeline(passes)
    has_kv = any(spec.name == "kv" for spec in specs)
    if has_kv and ctx_len is None:
        ctx_len = DEFAULT_CTX_LEN
    # An explicit --ctx-len with a pipeline that does not use it is refused, as by qeff-opt.
    pipeline = build_passes(specs, {"ctx_len": str(ctx_len)} if ctx_len is not None else None)

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
    v = result.report.verification
    if "token_agreement" in v:
        # kv verifies by generation: the rewritten model has different inputs than the original.
        console.print(
            f"3. verified in onnxruntime by greedy generation, KV model vs the original graph: "
            f"tokens agree {v['token_agreement']} ({v['steps']} steps from prompts of "
            f"{', '.join(map(str, v['prompts']))} tokens, ctx_len {v['ctx_len']}), max abs logits "
            f"difference {v['max_abs']:.2e} (tolerance {v['tolerance']:g})"
        )
    else:
        console.print(
            f"3. verified in onnxruntime: max abs difference {v['max_abs']:.2e} "
            f"(tolerance {v['tolerance']:g}) on inputs "
            + ", ".join(f"{k}{tuple(s)}" for k, s in v["inputs"].items())
        )

    generation = None
    if has_kv:
        generation = _generate(exported.path, result.output, result.manifest.get("ctx_len"), seed)
        _print_generation(console, generation)

    compiled = _dry_run_compile(console, result.output, workdir / "compile")
    console.print(
        f"files: {result.output.name}, {result.manifest_path.name}, report.json, compile/ in {workdir} "
        f"— done in {time.perf_counter() - start:.1f} s"
    )
    if generation is not None and not all(generation.matches):
        from qeff.errors import VerificationError

        bad = generation.matches.index(False)
        raise VerificationError(
            f"the KV model's greedy tokens differ from the original export's for prompt #{bad}",
            "see the generation table above; rerun with --debug and report it",
        )
    return {"export": exported, "optimize": result, "generation": generation, "compile": compiled}


def _dry_run_compile(console: Console, model: Path, folder: Path):
    """Step 5: the compile files and the exact compiler command (no compiler is needed for it)."""
    from qeff.backend_aic import CompileOptions, compile_model
    from qeff.errors import QeffError

    try:
        compiled = compile_model(model, folder, CompileOptions(dry_run=True))
    except QeffError as e:  # e.g. a plain export whose symbols the compile cannot size
        console.print(f"5. dry-run compile skipped: {e}")
        return None
    console.print(f"5. dry-run compile: wrote {', '.join(sorted(compiled.files.values()))} to {folder}; "
                  "on a machine with the Cloud AI SDK the command is:")
    console.print(compiled.command_text, soft_wrap=True, markup=False, highlight=False)
    return compiled


def _generate(reference: Path, kv_model: Path, ctx_len: int | None, seed: int) -> DemoGeneration:
    """Greedy generation with the KV model and with the original export, timed per call."""
    from qeff.passes.kv_runner import KVRunner, greedy_reference, logits_differences

    runner = KVRunner(kv_model, ctx_len)
    ctx = runner.ctx_len
    # A small --ctx-len shrinks the prompts and the number of new tokens instead of failing.
    lengths = [min(n, max(1, ctx // 2)) for n in _PROMPT_LENGTHS]
    new_tokens = max(1, min(_NEW_TOKENS, ctx - max(lengths) + 1))
    vocab = next(o.shape[-1] for o in runner.session.get_outputs() if o.name == "logits")
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 100
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in lengths]

    chunk = runner.static_seq or _CHUNK
    # onnxruntime allocates on the first call of each input shape; one untimed prefill chunk and
    # decode step keep that out of the numbers of a model this small.
    runner.generate(prompts, min(2, new_tokens), chunk=chunk)
    got = runner.generate(prompts, new_tokens, chunk=chunk)
    ref = greedy_reference(reference, prompts, new_tokens)
    # Per step, the worst prompt among those still comparable at that step.
    per_prompt = logits_differences(got, ref)
    per_step = []
    for s in range(new_tokens):
        diffs = [d[s] for d in per_prompt if s < len(d)]
        if not diffs:
            break
        per_step.append(max(diffs))
    return DemoGeneration(
        prompts=prompts,
        tokens=got.tokens,
        reference=ref.tokens,
        max_abs_per_step=per_step,
        ctx_len=ctx,
        chunk=chunk,
        prefill_calls=got.prefill_calls,
        prefill_seconds=got.prefill_seconds,
        decode_seconds=got.decode_seconds,
        decode_tokens=len(prompts) * (new_tokens - 1),
    )


def _print_generation(console: Console, g: DemoGeneration) -> None:
    new_tokens = len(g.tokens[0])
    console.print(
        f"4. greedy generation, {new_tokens} new tokens: KV model (ctx_len {g.ctx_len}, prefill in "
        f"chunks of {g.chunk}, then one token per step) vs the original export recomputing the "
        f"whole sequence at every step"
    )
    table = Table(title="generation", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    table.add_column("KV model")
    table.add_column("reference")
    table.add_column("match", justify="center")
    for i, (prompt, got, ref, same) in enumerate(zip(g.prompts, g.tokens, g.reference, g.matches)):
        table.add_row(
            str(i),
            " ".join(map(str, prompt)),
            " ".join(map(str, got)),
            " ".join(map(str, ref)),
            "[green]✓[/]" if same else "[bold red]✗[/]",
        )
    console.print(table)
    console.print(
        "max abs logits difference per step (0 = prefill, worst prompt): "
        + " ".join(f"{d:.1e}" for d in g.max_abs_per_step)
    )
    decode = (
        f"decode {g.decode_tokens} tokens in {g.decode_seconds * 1e3:.1f} ms = "
        f"{g.decode_tokens_per_second:,.0f} tokens/s (batch {len(g.prompts)})"
        if g.decode_tokens
        else "no decode steps"
    )
    console.print(
        f"timings (onnxruntime CPU, this run): prefill {len(g.prompts)} prompts in {g.prefill_calls} "
        f"chunk{'s' if g.prefill_calls != 1 else ''} of {g.chunk}: {g.prefill_seconds * 1e3:.1f} ms; {decode}"
    )
