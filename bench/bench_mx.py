#!/usr/bin/env python
"""MX benchmark: the C kernel against plain NumPy, and the ``mxfp6`` pass on a large model.

1. Kernel: MX quantize-dequantize of one 4096×4096 float32 tensor to fp6_e2m3 (blocks of 32
   along the last axis and along axis 0) with the C kernel and with the NumPy implementation
   (``qeff.passes.mx.quantize_dequantize_numpy``), in the same run, single-threaded (neither
   uses threads). Prints GB/s of each (input bytes / best of ``--repeat`` runs) and the ratio,
   after checking that both give the same bits. Targets: kernel >= 2 GB/s, ratio >= 5.
2. Pass: generates a Llama-shaped model of ``--size-gb`` GiB with external data (the generator
   of ``bench_io.py``), then times a plain copy of its files and ``qeff-opt --passes mxfp6``
   in a child process whose peak RSS is measured. Targets: time <= 3× the copy, peak RSS <= 1 GB.
   ``--size-gb 0`` skips this part.

GB means GiB. Exit code 0 even when a target is missed (1 with ``--strict``), 2 on errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_io  # noqa: E402  (the model generator and the RSS-measuring launcher)

from qeff.passes.mx import quantize_dequantize, quantize_dequantize_numpy  # noqa: E402
from qeff.passes.mx.weights import weight_uses  # noqa: E402

GB = 1 << 30
TARGET_KERNEL_GBS = 2.0
TARGET_KERNEL_RATIO = 5.0
TARGET_PASS_RATIO = 3.0
TARGET_PASS_RSS_GB = 1.0


def best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_kernel(size: int, repeat: int) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    out = np.empty_like(x)
    results: dict[str, Any] = {"tensor": [size, size], "format": "fp6_e2m3"}
    for axis in (-1, 0):
        kernel_s = best_seconds(lambda: quantize_dequantize(x, "fp6_e2m3", axis=axis, out=out), repeat)
        numpy_s = best_seconds(lambda: quantize_dequantize_numpy(x, "fp6_e2m3", axis=axis), max(1, repeat // 2))
        same = np.array_equal(quantize_dequantize_numpy(x, "fp6_e2m3", axis=axis).view(np.uint32),
                              quantize_dequantize(x, "fp6_e2m3", axis=axis).view(np.uint32))
        if not same:
            raise RuntimeError(f"kernel and NumPy disagree along axis {axis}")
        results[f"axis{axis}"] = {"kernel_gbs": x.nbytes / kernel_s / 1e9, "numpy_gbs": x.nbytes / numpy_s / 1e9,
                                  "ratio": numpy_s / kernel_s}
    worst = min(results["axis-1"]["kernel_gbs"], results["axis0"]["kernel_gbs"])
    ratio = min(results["axis-1"]["ratio"], results["axis0"]["ratio"])
    results["targets"] = {"kernel_gbs_min": TARGET_KERNEL_GBS, "ratio_min": TARGET_KERNEL_RATIO,
                          "kernel_pass": worst >= TARGET_KERNEL_GBS, "ratio_pass": ratio >= TARGET_KERNEL_RATIO}
    return results


def bench_pass(size_gb: float, repeat: int, workdir: Path) -> dict[str, Any]:
    model_dir, copy_dir, out_dir = workdir / "model", workdir / "copy", workdir / "out"
    for d in (copy_dir, out_dir):
        d.mkdir(parents=True, exist_ok=True)
    gen = bench_io.generate_model(model_dir, size_gb)
    print(f"generated {gen.nbytes / GB:.2f} GB model in {model_dir}", flush=True)
    copy_outputs = [copy_dir / bench_io.MODEL_NAME, copy_dir / bench_io.DATA_NAME]
    out_model = out_dir / bench_io.MODEL_NAME
    outputs = [out_model, out_dir / bench_io.DATA_NAME, out_dir / "model.qeff.json"]
    bench_io._prepare(*copy_outputs)
    bench_io.copy_model(model_dir, copy_dir)  # untimed: warms the page cache
    copies, runs, peaks = [], [], []
    for _ in range(repeat):
        bench_io._prepare(*copy_outputs)
        copies.append(bench_io.copy_model(model_dir, copy_dir))
        bench_io._prepare(*outputs)
        seconds, rss = bench_io.run_qeff_opt(gen.path, out_model, passes="mxfp6")
        runs.append(seconds)
        peaks.append(rss)
        print(f"  copy {copies[-1]:.2f} s, qeff-opt mxfp6 {seconds:.2f} s, peak RSS {rss / GB:.3f} GB", flush=True)
    manifest = json.loads((out_dir / "model.qeff.json").read_text())
    quantized = manifest["mx"]["weights"]
    sample = ir.load(out_model)
    weight, uses = next(iter(weight_uses(sample.graph).items()))  # the first MatMul weight
    array = weight.const_value.numpy()
    again = quantize_dequantize(array, "fp6_e2m3", axis=uses[0].axis)
    if not np.array_equal(again.view(np.uint32), array.view(np.uint32)):
        raise RuntimeError(f"{weight.name} in the output is not on the MXFP6 grid")
    ratio = min(runs) / min(copies)
    rss_gb = max(peaks) / GB
    return {"model_gb": gen.nbytes / GB, "copy_s": min(copies), "mxfp6_s": min(runs), "ratio": ratio,
            "peak_rss_gb": rss_gb, "weights_quantized": quantized,
            "targets": {"ratio_max": TARGET_PASS_RATIO, "peak_rss_gb_max": TARGET_PASS_RSS_GB,
                        "ratio_pass": ratio <= TARGET_PASS_RATIO, "peak_rss_pass": rss_gb <= TARGET_PASS_RSS_GB}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the square kernel tensor")
    parser.add_argument("--size-gb", type=float, default=3.0, help="model size for the pass run (0: skip)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the model goes (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results: dict[str, Any] = {"kernel": bench_kernel(args.size, args.repeat)}
        for axis in ("axis-1", "axis0"):
            r = results["kernel"][axis]
            print(f"kernel {axis:7s}: C {r['kernel_gbs']:.2f} GB/s, NumPy {r['numpy_gbs']:.3f} GB/s, "
                  f"ratio {r['ratio']:.1f}x")
        if args.size_gb > 0:
            with bench_io.work_folder(args.workdir, False, "qeff-bench-mx-") as workdir:
                results["pass"] = bench_pass(args.size_gb, args.repeat, workdir)
            r = results["pass"]
            print(f"mxfp6 on {r['model_gb']:.2f} GB: {r['mxfp6_s']:.2f} s vs copy {r['copy_s']:.2f} s = "
                  f"{r['ratio']:.2f}x (target <= {TARGET_PASS_RATIO}), peak RSS {r['peak_rss_gb']:.3f} GB "
                  f"(target <= {TARGET_PASS_RSS_GB})")
    except RuntimeError as e:
        print(f"bench_mx: error: {e}", file=sys.stderr)
        return 2
    targets = [v for part in results.values() for k, v in part["targets"].items() if k.endswith("_pass")]
    results["all_targets_met"] = all(targets)
    print("targets met" if all(targets) else "a target was missed")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if args.strict and not all(targets) else 0


if __name__ == "__main__":
    sys.exit(main())
