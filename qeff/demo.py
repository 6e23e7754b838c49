"""``qeff demo``: the whole flow on an embedded tiny model, end to end, on one screen.

1. build a tiny Hugging Face model with random weights (no hub needed) and export it plainly
   (TorchScript by default: its graphs carry the run-time shape arithmetic ``fold`` removes;
   the dynamo exporter already folds most of it);
2. check the export against torch in onnxruntime;
3. run the passes with ``--verify`` (original vs rewritten in onnxruntime);
4. print what changed.
"""

from __future__ import annotations

__all__ = ["run_demo"]

import time
from pathlib import Path

from rich.console import Console


def run_demo(
    *,
    arch: str = "llama",
    exporter: str = "torchscript",
    workdir: Path = Path("qeff-demo"),
    passes: str = "cleanup,fold",
    console: Console | None = None,
) -> dict:
    from qeff.frontend import export_model
    from qeff.passes import optimize

    console = console or Console()
    workdir = Path(workdir)
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
    result = optimize(exported.path, passes, out, verify=True, report_path=workdir / "report.json")
    console.print(f"2. ran {passes} → {result.output}")
    console.print(result.report.rich_table())
    v = result.report.verification
    console.print(
        f"3. verified in onnxruntime: max abs difference {v['max_abs']:.2e} "
        f"(tolerance {v['tolerance']:g}) on inputs "
        + ", ".join(f"{k}{tuple(s)}" for k, s in v["inputs"].items())
    )
    console.print(
        f"files: {result.output.name}, {result.manifest_path.name}, report.json in {workdir} "
        f"— done in {time.perf_counter() - start:.1f} s"
    )
    return {"export": exported, "optimize": result}
