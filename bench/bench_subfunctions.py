#!/usr/bin/env python
"""Size and load time of a deep decoder with its layers outlined into ONNX functions, against flat.

Compile time of ahead-of-time compilers grows with the number of layer copies in the graph; the
``subfunctions`` pass leaves one body per kind of layer and one call per layer. Without the
Cloud AI compiler at hand, the closest measurable proxies are the size of the ``.onnx`` protobuf
and the time onnxruntime takes to create a session. The script

1. exports the tiny Llama with ``--layers`` layers (default 32; hidden 64, 4 heads, 2 KV heads,
   dynamo, weights inline) into the work folder, as ``bench_kv.py`` does (not timed);
2. writes the flat model, ``optimize(path, PIPELINE)``, and the outlined one,
   ``optimize(path, PIPELINE + ",subfunctions")``, for each pipeline in ``--pipelines``
   (default: the plain export and ``kv``);
3. measures for each: the main graph's node count, the ``.onnx`` file size, the protobuf size
   without the weights' bytes (the graph structure), and the best of ``--repeat`` onnxruntime
   session creations (default optimisation level; flat and outlined in alternation, after one
   untimed creation of each);
4. checks (not timed) that both compute the same outputs bit for bit on one input
   (onnxruntime's basic optimisation level) and that the main graph holds one call per layer;
5. prints every number of the outlined model as a ratio to the flat baseline of the same run.

Exit code 0; 2 when a step fails or the outputs differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import work_folder  # noqa: E402
from bench_kv import BenchError, export_llama  # noqa: E402

DEFAULT_PIPELINES = ("", "kv:ctx_len=128")


def structure_bytes(path: Path) -> int:
    """The protobuf size with every initializer's data left out."""
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for field in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
            tensor.ClearField(field)
    return proto.ByteSize()


def session_seconds(path: Path) -> float:
    from qeff.common.onnxrt import onnxruntime_session

    start = time.perf_counter()
    onnxruntime_session(path)
    return time.perf_counter() - start


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from qeff.common.onnxrt import onnxruntime_session

    session = onnxruntime_session(path, level=1)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def measure(plain: Path, folder: Path, pipeline: str, layers: int, repeat: int) -> dict[str, Any]:
    from qeff.optimizer import optimize
    from qeff.passes.ir.sample_inputs import sample_inputs

    folder.mkdir(parents=True, exist_ok=True)
    flat_spec = pipeline or "cleanup"
    flat = optimize(plain, flat_spec, output=folder / "flat.onnx").output
    outlined = optimize(plain, f"{pipeline + ',' if pipeline else ''}subfunctions", output=folder / "outlined.onnx").output
    flat_model, outlined_model = ir.load(flat), ir.load(outlined)
    calls = sum(1 for n in outlined_model.graph if n.domain == "qeff.subfunctions")
    if calls != layers:
        raise BenchError(f"{pipeline or 'plain'}: {calls} calls in the main graph, expected {layers}")
    feeds = sample_inputs(flat_model, dims={"batch_size": 1, "batch": 1})
    a, b = outputs(flat, feeds), outputs(outlined, feeds)
    if list(a) != list(b) or not all(np.array_equal(a[k], b[k]) for k in a):
        raise BenchError(f"{pipeline or 'plain'}: the outlined model's outputs differ from the flat model's")
    session_seconds(flat), session_seconds(outlined)  # untimed: first-call costs
    flat_runs, outlined_runs = [], []
    for _ in range(repeat):
        flat_runs.append(session_seconds(flat))
        outlined_runs.append(session_seconds(outlined))
    row = {
        "pipeline": pipeline or "plain",
        "flat": {"nodes": len(flat_model.graph), "file_bytes": flat.stat().st_size,
                 "structure_bytes": structure_bytes(flat), "session_s": min(flat_runs)},
        "outlined": {"nodes": len(outlined_model.graph), "calls": calls,
                     "function_nodes": sum(len(f) for f in outlined_model.functions.values()),
                     "file_bytes": outlined.stat().st_size, "structure_bytes": structure_bytes(outlined),
                     "session_s": min(outlined_runs)},
    }
    row["ratio"] = {k: row["outlined"][k] / row["flat"][k] for k in ("nodes", "file_bytes", "structure_bytes",
                                                                       "session_s")}
    return row


def report(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        f, o, r = row["flat"], row["outlined"], row["ratio"]
        print(f"\n{row['pipeline']}:")
        print(f"  main-graph nodes   {f['nodes']:>10d} -> {o['nodes']:>10d}  x{r['nodes']:.3f} "
              f"({o['calls']} calls, {o['function_nodes']} nodes in the function bodies)")
        print(f"  .onnx bytes        {f['file_bytes']:>10d} -> {o['file_bytes']:>10d}  x{r['file_bytes']:.3f}")
        print(f"  without weights    {f['structure_bytes']:>10d} -> {o['structure_bytes']:>10d}  "
              f"x{r['structure_bytes']:.3f}")
        print(f"  ORT session (s)    {f['session_s']:>10.3f} -> {o['session_s']:>10.3f}  x{r['session_s']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the exported Llama (default 32)")
    ap.add_argument("--pipelines", default="|".join(DEFAULT_PIPELINES),
                    help="passes run before subfunctions, '|'-separated; empty = the plain export "
                         "(default: '|kv:ctx_len=128')")
    ap.add_argument("--repeat", type=int, default=5, help="timed session creations of each model (best kept)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.layers < 2 or args.repeat < 1:
        ap.error("--layers must be at least 2 and --repeat at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from qeff.errors import QeffError

    args = parse_args(argv)
    try:
        with work_folder(args.workdir, args.keep, "qeff-bench-subfunctions-") as workdir:
            print(f"exporting a {args.layers}-layer Llama ...", flush=True)
            (workdir / "model").mkdir(parents=True, exist_ok=True)
            plain = export_llama(workdir / "model" / "model.onnx", args.layers, args.seed)
            rows = [measure(plain, workdir / f"p{i}", pipeline, args.layers, args.repeat)
                    for i, pipeline in enumerate(args.pipelines.split("|"))]
    except (BenchError, QeffError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
