"""Every pass holds a bounded number of weights: on a generated Llama-shaped model of 0.4 GB,
each pass's peak RSS (measured in a child process) stays far below the model's size.

The bound is the interpreter's own footprint (a run on a tiny model, measured here, with
onnxruntime loaded as kv's mask probe and --verify load it) plus the largest single weight plus a
margin: a pass may hold the weight it is working on, never the model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import bench_io  # noqa: E402

SIZE_GB = 0.4

# Runs the command in a grandchild and prints that process's peak RSS in bytes: the getrusage
# of this wrapper's children only, not of every child the test session started before.
_MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(args: list[str]) -> int:
    command = [sys.executable, "-c", "from qeff.entry import opt_main; opt_main()", *args]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    return bench_io.generate_model(folder / "model", SIZE_GB, seed=0)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from tests.graphs import mlp_model, save

    folder = tmp_path_factory.mktemp("tiny")
    model = save(mlp_model()[0], folder / "m.onnx")
    # --verify runs both models in onnxruntime: its libraries count as footprint, not as weights
    return _peak_rss([str(model), "--passes", "cleanup", "-o", str(folder / "o.onnx"), "-q", "--verify"])


@pytest.mark.parametrize("passes", ["cleanup", "fold", "kv:ctx_len=64", "fixed:batch_size=1,seq_len=8", "fp16clip",
                                    "mxfp6", "mxint8", "kv:ctx_len=64,mxint8kv",
                                    "cleanup,fold,kv:ctx_len=64,fixed:batch_size=1,seq_len=1,fp16clip,mxfp6"])
def test_each_pass_holds_a_bounded_number_of_weights(passes, generated, baseline, tmp_path):
    import onnx_ir as ir

    model = ir.load(generated.path)
    largest = max(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    del model
    peak = _peak_rss([str(generated.path), "--passes", passes, "-o", str(tmp_path / "o.onnx"), "-q"])
    bound = baseline + largest + (64 << 20)
    assert peak <= bound, f"{passes}: peak RSS {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert bound < 0.75 * generated.nbytes  # far below the model, or the test proves nothing
