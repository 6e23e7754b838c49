"""A stand-in ``qaic-runner`` and the card it pretends to run on, written by the tests.

The card is :data:`PERFORMANCE`, a formula of (cores, mos, ols, batch size, instances, set size)
giving inferences/s and the latency of one call in µs: cores speed a batch up sublinearly and
cost a synchronisation each, mos and ols have a best value, large batches pay for memory, a
larger set size hides host time but queues, instances share the card's memory bandwidth. Its
best points differ per objective, lie inside the space and on the ``cores × instances`` boundary.

The runner reads what the QPC was compiled with from ``standin-flags.json``, which the stand-in
compiler writes when ``STANDIN_RECORD_FLAGS`` is set (cores from ``-aic-num-cores``, the batch
size from ``-stats-batchsize``). It checks its own flags as the real runner takes them, prints
the real stats line (``InferenceCnt N TotalDuration Nus BatchSize N Inf/Sec X``) and writes one
latency file per activation in the real layout: four header lines, then a CSV whose
``totalRoundtripTimeUs`` samples are spread symmetrically around the formula's latency, so their
median is that latency. ``STANDIN_RUNS`` names a file that gets one line per run.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

PERFORMANCE = '''
def performance(cores, mos, ols, bs, instances, set_size):
    """(inferences/s, latency of one call in µs) of the stand-in card."""
    speed = cores / (1 + 0.06 * (cores - 1))
    split = (1 + 0.04 * (mos - 2) ** 2) * (1 + 0.03 * (ols - 3) ** 2)
    device = 300 + bs * 1000 / speed * split * (1 + 0.002 * bs * bs) + 25 * cores
    host = 200 + 20 * bs
    period = device + host / set_size + 5 * set_size
    share = 1 / (1 + 0.03 * (instances - 1))
    rate = instances * bs / period * share * 1e6
    latency = (device + host) * (1 + 0.08 * (instances - 1)) * (1 + 0.1 * (set_size - 1))
    return rate, latency
'''

SAMPLES = 21  # per activation; odd, so the median is the middle sample

SCRIPT = r'''
import json, os, sys
from pathlib import Path

def fail(message):
    print("ERROR: " + message, flush=True)
    sys.exit(1)

args = sys.argv[1:]
takes_value = {"-t", "-a", "-S", "-d", "--time", "--aic-profiling-type", "--aic-profiling-out-dir",
               "--aic-profiling-start-iter", "--aic-profiling-num-samples"}
opts = {}
while args:
    flag = args.pop(0)
    if flag not in takes_value or not args:
        fail(f"unknown flag or missing value: {flag}")
    opts[flag] = args.pop(0)
if os.environ.get("STANDIN_RUNS"):
    with open(os.environ["STANDIN_RUNS"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
qpc = Path(opts.get("-t", ""))
if not (qpc / "programqpc.bin").is_file():
    fail(f"-t {qpc}: no programqpc.bin")
flags = json.loads((qpc / "standin-flags.json").read_text())
cores = int(flags["-aic-num-cores"])
mos = int(flags.get("-mos", 1))
ols = int(flags.get("-ols", 1))
bs = int(flags["-stats-batchsize"])
instances, set_size, seconds = int(opts["-a"]), int(opts["-S"]), float(opts["--time"])
if instances * cores > 16:
    fail(f"not enough cores for {instances} activations of {cores} cores")
if opts.get("--aic-profiling-type") != "latency":
    fail("--aic-profiling-type latency expected")
out = Path(opts["--aic-profiling-out-dir"])
rate, latency = performance(cores, mos, ols, bs, instances, set_size)
calls = max(1, round(rate * seconds / bs))
print("Using bounded random inputs")
print(" ---- Stats ----")
print(f"InferenceCnt {calls} TotalDuration {round(seconds * 1e6)}us BatchSize {bs} Inf/Sec {rate:.3f}")
columns = ["Sample", "queueDepth", "numInfInQueue", "hostRoundTripUs", "enqTimeUs", "preProcTimeUs",
           "submitTimeUs", "execTotalUs", "exectoVcUs", "execToCompleteUs", "postProcUs", "totalRoundtripTimeUs"]
n = SAMPLES
for program in range(instances):
    path = out / f"aic-profiling-program-{program}-latency.txt"
    lines = [f"Program: {qpc}", f"Activation: {program}", f"Samples: {n}", "Units: microseconds",
             ", ".join(columns)]
    for i in range(n):
        total = latency * (1 + 0.01 * (i - n // 2) / (n // 2))
        fields = [i, set_size, 1, total - 12.5, 1.5, 4.0, 1.25, total - 6.0, "N/A", total - 13.0, 2.5, total]
        lines.append(", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in fields))
    path.write_text("\n".join(lines) + "\n")
    print(f"Writing file:{path}")
'''


def write_runner(folder: Path, name: str = "qaic-runner") -> Path:
    """An executable stand-in runner called ``name`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable} -S\n{PERFORMANCE}\nSAMPLES = {SAMPLES}\n{SCRIPT}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


_SCOPE: dict = {}
exec(PERFORMANCE, _SCOPE)  # noqa: S102 - the text above, the same the runner runs


def performance(cores: int, mos: int, ols: int, bs: int, instances: int, set_size: int) -> tuple[float, float]:
    """The stand-in card's formula, for the tests' own brute force."""
    return _SCOPE["performance"](cores, mos, ols, bs, instances, set_size)


__all__ = ["write_runner", "performance", "PERFORMANCE", "SAMPLES"]
