"""``qeff demo --encoder``: the classic encoder flow on the embedded tiny BERT, on one screen.

1. export a tiny BERT with a question-answering head (random weights), checked against torch;
2. ``fixed:symbols=sequence_length,fp16clip`` with ``--verify`` (in fp16 simulation): the
   extended attention mask ``(1 - mask) * finfo.min`` becomes a select;
3. a right-padded batch in fp16 simulation against fp32, and each padded row against the row
   run alone;
4. a dry-run compile with ``-onnx-define-symbol`` and ``-multicast-weights``;
5. ``qeff bench``: inferences/s and latency percentiles on onnxruntime.
"""

from __future__ import annotations

__all__ = ["run_encoder_demo"]

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def run_encoder_demo(*, arch: str = "bert", task: str = "qa", workdir: Path = Path("qeff-demo-encoder"),
                     seq_len: int = 128, console: Console | None = None) -> dict:
    from qeff.backend_aic import CompileOptions, compile_model
    from qeff.common.onnxrt import run_model
    from qeff.frontend.encoder import build_tiny_encoder, export_encoder
    from qeff.optimizer import optimize
    from qeff.passes.fp16.simulation import run_fp16
    from qeff.runtime.throughput import bench_model
    from qeff.verify import describe

    console = console or Console()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console.rule(f"[bold]qeff demo --encoder[/] — tiny {arch}, task {task}")
    exported = export_encoder(build_tiny_encoder(arch, task), task, workdir / f"tiny-{arch}-{task}.onnx")
    console.print(f"1. exported tiny {arch} ({task}: {', '.join(exported.outputs)}) with TorchScript, opset 17, "
                  f"to {exported.path} — onnxruntime vs torch max abs diff {exported.max_abs_diff:.2e}", markup=False)

    out = workdir / f"tiny-{arch}-{task}.fixed.fp16clip.onnx"
    result = optimize(exported.path, "fixed:symbols=sequence_length,fp16clip", out, verify=True,
                      report_path=workdir / "report.json")
    v = result.report.verification
    console.print(f"2. ran fixed:symbols=sequence_length,fp16clip → {result.output}")
    console.print(result.report.rich_table())
    console.print(f"   verified: {describe(v)}", markup=False, highlight=False)

    rng = np.random.default_rng(0)
    lengths = [12, 7, 3]
    mask = (np.arange(12)[None] < np.array(lengths)[:, None]).astype(np.int64)
    feeds = {"input_ids": np.where(mask == 1, rng.integers(3, 512, (3, 12)), 0), "attention_mask": mask}
    if "token_type_ids" in exported.inputs:
        feeds["token_type_ids"] = np.zeros_like(mask)
    fp32, fp16 = run_model(exported.path, feeds), run_fp16(result.output, feeds)
    worst_fp16 = max(float(np.abs(fp16[k] - fp32[k]).max()) for k in fp32)
    worst_pad = 0.0
    for r, n in enumerate(lengths):
        alone = run_model(result.output, {k: a[r:r + 1, :n] for k, a in feeds.items()})
        for k, a in alone.items():
            row = fp32[k][r, :n] if fp32[k].ndim >= 2 and fp32[k].shape[1] == 12 else fp32[k][r]
            worst_pad = max(worst_pad, float(np.abs(row - a[0]).max()))
    console.print(f"3. a padded batch of {len(lengths)} (lengths {', '.join(map(str, lengths))}): fp16 simulation "
                  f"vs fp32 max abs difference {worst_fp16:.2e}, all finite: "
                  f"{all(np.isfinite(a).all() for a in fp16.values())}; padded rows vs each row alone: "
                  f"{worst_pad:.2e}")

    compiled = compile_model(result.output, workdir / "compile",
                             CompileOptions(dry_run=True, batch_size=8, define_symbols={"sequence_length": seq_len},
                                            multicast_weights=True))
    console.print("4. dry-run compile (no compiler needed); on a machine with the Cloud AI SDK the command is:")
    console.print(compiled.command_text, soft_wrap=True, markup=False, highlight=False)

    rows = bench_model(result.output, [1, 4], [1, 2], seq_len=seq_len, duration=0.5)
    table = Table(title=f"5. qeff bench (onnxruntime CPU, sequence length {seq_len})", title_justify="left")
    for column in ("batch", "instances", "inferences/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.batch_size), str(r.instances), f"{r.inferences_per_s:,.1f}", f"{r.p50_ms:.2f}",
                      f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}")
    console.print(table)
    console.print(f"files in {workdir} — done in {time.perf_counter() - start:.1f} s")
    return {"export": exported, "optimize": result, "compile": compiled, "bench": rows,
            "fp16_max_abs": worst_fp16, "padding_max_abs": worst_pad}
