"""bench/bench_scale.py: the checkpoint writer makes folders transformers loads bit for bit, and
a tiny run goes through every stage and reports the table and the JSON."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_scale.py"


def _load_bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_scale():
    return _load_bench_scale()


def _run_script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_bf16_rounding_matches_torch(bench_scale):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(10000, dtype=np.float32) * np.float32(0.02),
        # exact ties between two bf16 values, both parities of the kept mantissa
        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0, 65504.0], dtype=np.float32),
    ])
    ours = bench_scale._to_bf16(values.copy())
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("size, params", [("1b", 1_235_814_400), ("3b", 3_212_749_824), ("8b", 8_030_261_248)])
def test_real_sizes_match_transformers(bench_scale, size, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = bench_scale.SIZES[size]
    assert bench_scale.parameter_count(config) == params  # the published models' counts
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del expected["lm_head.weight"]  # not stored: the embedding is the head
    assert {s.name: s.shape for s in bench_scale.tensor_specs(config)} == expected


def test_tiny_checkpoint_loads_bit_for_bit(bench_scale, tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open

    folder = tmp_path / "ckpt"
    # Shards of 64 KiB: several files and an index, as real checkpoints have.
    info = bench_scale.write_checkpoint(folder, "tiny", seed=3, shard_gb=64 / (1 << 20))
    assert len(info["files"]) > 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == info["tensor_bytes"]
    assert set(index["weight_map"].values()) == set(info["files"])
    specs = bench_scale.tensor_specs(bench_scale.SIZES["tiny"])
    assert set(index["weight_map"]) == {s.name for s in specs}

    raw = (folder / info["files"][0]).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert length % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    entries = [v for k, v in header.items() if k != "__metadata__"]
    assert {e["dtype"] for e in entries} == {"BF16"}
    assert max(e["data_offsets"][1] for e in entries) == len(raw) - 8 - length
    with safe_open(str(folder / info["files"][0]), framework="numpy") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}

    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is True

    result = bench_scale.verify_checkpoint(folder, "tiny", seed=3)
    assert result["tensors_checked"] == len(specs)
    with pytest.raises(bench_scale.BenchError, match="differs from the generated values"):
        bench_scale.verify_checkpoint(folder, "tiny", seed=4)


def test_stage_failures_are_reported(tmp_path):
    # A stage killed by the memory watch and a stage whose input is missing: both in the table and
    # the JSON, the script goes on and exits 1. No torch: the checkpoint child only uses numpy.
    out = tmp_path / "out.json"
    proc = _run_script("--size", "tiny", "--stages", "checkpoint,export,opt", "--mem-limit-gb", "0.001",
                       "--workdir", str(tmp_path / "work"), "--json", str(out), timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {row["stage"]: row for row in json.loads(out.read_text())["stages"]}
    assert rows["checkpoint"]["status"] == "failed" and rows["checkpoint"]["killed_for_memory"]
    assert rows["checkpoint"]["rc"] == -9
    assert rows["export"]["status"] == "skipped" and "checkpoint" in rows["export"]["note"]
    assert rows["opt"]["status"] == "skipped"
    assert "killed: RSS over the" in proc.stdout


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "out.json"
    work = tmp_path / "work"
    proc = _run_script("--size", "tiny", "--new-tokens", "8", "--workdir", str(work), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "copy-ratio" in proc.stdout and "kv model vs Hugging Face: same tokens" in proc.stdout

    results = json.loads(out.read_text())
    assert results["checkpoint_check"]["tensors_checked"] == 20
    rows = results["stages"]
    assert [r["stage"] for r in rows] == ["checkpoint", "export", "hf-generate", "opt", "opt-kv", "compile",
                                          "run-kv", "run-mxfp6", "eval-kv"]
    for row in rows:
        assert row["status"] == "ok" and row["rc"] == 0, row
        assert row["wall_s"] > 0 and row["peak_rss_gb"] > 0 and row["bytes_written"] > 0, row
        for key in ("copy_ratio", "copy_s", "disk_gb", "free_disk_gb", "io_write_bytes", "cmd", "log"):
            assert key in row, key
    gen = results["generation"]
    assert gen["kv_vs_hf"]["equal"] and len(gen["hf_tokens"]) == 8
    assert gen["hf_distinct_tokens"] > 1  # the comparison is not between two constant streams
    assert gen["kv_decode_tokens_per_s"] > 0 and gen["hf_decode_tokens_per_s"] > 0
    assert gen["mxfp6_vs_hf"] is not None
    # qeff eval drove the kv model as deployed next to the plain export: the same predictions
    assert results["eval"]["kind"] == "kv" and results["eval"]["tokens"] == 160 - 16
    assert results["eval"]["top1_agreement"] == 1.0 and abs(results["eval"]["perplexity_change"]) < 1e-5
    assert "qeff eval, kv model vs the plain export on 144 held-out tokens" in proc.stdout
    streaming = results["weight_streaming"]
    kv_bytes = next(r["bytes_written"] for r in rows if r["stage"] == "opt-kv")
    assert streaming["copy_gb_per_s"] > 0.1
    assert streaming["kv_weights_gb_per_s"] * 2**30 == pytest.approx(gen["kv_decode_tokens_per_s"] * kv_bytes)
    # Without --keep, the models are gone once no later stage reads them.
    for folder in ("checkpoint", "export", "opt", "opt-kv"):
        assert not (work / folder).exists(), folder
    assert (work / "compile" / "command.txt").exists()
