#!/usr/bin/env python
"""Scale benchmark: the whole flow (export, qeff-opt, compile, run) on a real-size Llama checkpoint.

The script

1. writes a Hugging Face checkpoint folder with the shape of a real Llama (``--size 1b``:
   Llama-3.2-1B, ``3b``: Llama-3.2-3B, ``8b``: Llama-3-8B, ``tiny``: hidden 64, 2 layers, for
   tests): ``config.json`` with the real model's fields (llama3 rope scaling, tied embeddings
   where the real model ties them) and bf16 safetensors shards of at most ``--shard-gb`` GiB with
   ``model.safetensors.index.json``. The safetensors files are written here, tensor by tensor
   and each tensor in chunks, so that no model is ever held in memory (a few hundred MB at
   most). Weights are ``0.02 * N(0, 1)`` (``tiny``: 0.2, see ``SIZE_WEIGHT_STD``) from a generator
   seeded by (``--seed``, tensor name), so any tensor can be regenerated alone to check a load;
   norms are ones. ``--verify-checkpoint`` (default for ``tiny``) loads the folder with
   ``from_pretrained`` and compares every weight. There is no tokenizer:
   every run uses token ids;
2. runs each stage in a fresh child process and measures its wall time (until its data is on
   disk: an ``os.sync`` ends the timing, as in ``bench_io.py``), its peak RSS (``os.wait4`` in a
   small launcher, see ``_LAUNCHER``), the bytes it left in its output folder, the time of a
   plain ``shutil.copyfile`` of those files in the same run (the baseline of the copy-ratio),
   and the disk used by the work folder. The stages:

   - ``checkpoint``: writing the folder above;
   - ``export``: ``qeff export CHECKPOINT -o export/model.onnx --external-data --exporter E
     --check C`` (``--exporter``, default dynamo; ``--check``, default none: the prefix check
     adds a bounded comparison with torch, the full one would hold the model twice);
   - ``hf-generate``: Hugging Face ``generate`` on the checkpoint (float32, eager attention,
     greedy, ``--new-tokens`` tokens from the same ids), the reference for the runs;
   - ``opt``: ``qeff-opt export/model.onnx --passes cleanup,fold,kv,fixed,fp16clip,mxfp6
     --ctx-len N -o opt/model.kv.onnx`` (the README's pipeline);
   - ``opt-kv``: the same with ``--passes kv`` only, for an exact token comparison (the mxfp6
     pass changes the weights, so its tokens may part from float32 ones);
   - ``compile``: ``qeff compile opt/model.kv.onnx -o compile --dry-run``;
   - ``run-kv`` / ``run-mxfp6``: ``qeff run MODEL --input-ids IDS --max-new-tokens N
     --stats-json ...`` on the two rewritten models;
   - ``eval-kv``: ``qeff eval opt-kv/model.kv.onnx --reference export/model.onnx`` on the first
     ``--eval-tokens`` tokens (default 160) of the reference model's held-out text, tokenized
     with its tokenizer (its ids are valid for any vocabulary of 2,048 or more), windows of 64:
     the KV model driven as deployed next to the plain export, both at once. Random weights
     make the perplexity meaningless; the point is the agreement (it must be 100 %) and the
     time and memory at real size.

   Generation stages (``hf-generate``, ``opt-kv``, ``run-*``, ``eval-kv``) run by default for ``tiny`` and
   ``1b`` only; ``--stages`` picks any subset. A stage whose input is missing (an earlier stage
   failed or was not run in this work folder) is skipped. A failing stage is recorded with its
   exit code and the script goes on with what does not depend on it. Each child is watched: one
   whose RSS passes ``--mem-limit-gb`` (default 90 % of the memory available when it starts) is
   killed, so that a run too big for the machine fails alone instead of waking the OOM killer;
3. deletes every output as soon as no later stage needs it (unless ``--keep``), so that ``8b``
   (15 GB checkpoint, 30 GB float32 export, 30 GB rewritten model, at most two at a time) fits in
   about 80 GB of disk;
4. prints the table (stage, wall s, peak RSS GB, bytes written, copy-ratio, disk GB, rc) and the
   generation comparison (tokens of ``run-kv`` against Hugging Face, agreement of ``run-mxfp6``,
   decode tokens/s of each) and writes them as JSON (``--json``).

The copy baseline copies a stage's output right after the stage, so both read from a warm page
cache. When the free disk cannot hold a second copy, only part of it is copied and the time is
scaled to the full size (``copy_extrapolated`` in the JSON). Outputs under 16 MiB get no ratio:
their copy takes milliseconds against seconds of start-up for any stage. The ratio of
``checkpoint`` includes generating the random numbers.

GB means GiB (2**30 bytes) everywhere, matching ``ru_maxrss`` (KiB on Linux).

Exit code: 0 when every stage ran, the ``run-kv`` tokens equal Hugging Face's and ``eval-kv``
agrees on every top-1 token; 1 when a stage failed or was skipped, or the tokens differ; 2 for bad arguments or a failed checkpoint check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import work_folder  # noqa: E402  (what the benchmarks share)

GB = 1 << 30
MB = 1 << 20
# Elements generated per chunk while writing a tensor: 8 Mi float32 = 32 MiB, with the rounding
# temporaries about 100 MiB, whatever the model size.
CHUNK_ELEMENTS = 1 << 23
WEIGHT_STD = 0.02
# tiny's layers would add next to nothing to its embeddings at 0.02 (hidden 64: each projection
# scales by 0.02 * sqrt(64)), so every greedy token would repeat the last prompt token and the
# token comparison would prove nothing. 0.2 gives varied tokens, as 0.02 does at hidden 2048.
SIZE_WEIGHT_STD = {"tiny": 0.2}
DEFAULT_SHARD_GB = 2.0
# Below this, a copy takes milliseconds while every stage pays seconds of interpreter start-up
# and imports: a ratio against it says nothing.
MIN_RATIO_BYTES = 16 * MB
# Free disk left alone when the copy baseline needs room.
DISK_MARGIN = 2 * GB
FULL_PIPELINE = "cleanup,fold,kv,fixed,fp16clip,mxfp6"
KV_PIPELINE = "kv"
CHECKPOINT_DIR = "checkpoint"
INDEX_NAME = "model.safetensors.index.json"

# The llama3 rope scaling of Llama-3.2-1B and -3B (config.json on the hub).
_LLAMA32_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
SIZES: dict[str, dict[str, Any]] = {
    # Small enough for a test, with the same features as 1b (tied, llama3 rope scaling, GQA).
    # vocab 2048: the reference tokenizer's ids (eval-kv) fit it
    "tiny": {**_COMMON, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 2048,
             "bos_token_id": 1, "eos_token_id": 2,
             "max_position_embeddings": 131072, "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True},
    "1b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "max_position_embeddings": 131072, "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True},
    "3b": {**_COMMON, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 131072, "rope_scaling": _LLAMA32_ROPE, "tie_word_embeddings": True},
    # Meta-Llama-3-8B: no rope scaling, 8k positions, a separate lm_head.
    "8b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 8192, "rope_scaling": None, "tie_word_embeddings": False},
}
GENERATION_SIZES = {"tiny", "1b"}
EVAL_WINDOW = 64

STAGES = ["checkpoint", "export", "hf-generate", "opt", "opt-kv", "compile", "run-kv", "run-mxfp6", "eval-kv"]
# What each stage reads (work-folder artifacts) and writes. An artifact is deleted (unless
# --keep) once no later selected stage reads it.
STAGE_INPUTS = {
    "checkpoint": [],
    "export": ["checkpoint"],
    "hf-generate": ["checkpoint"],
    "opt": ["export"],
    "opt-kv": ["export"],
    "compile": ["opt"],
    "run-kv": ["opt-kv"],
    "run-mxfp6": ["opt"],
    "eval-kv": ["export", "opt-kv"],
}
ARTIFACTS = {  # artifact -> folder in the work folder
    "checkpoint": CHECKPOINT_DIR,
    "export": "export",
    "hf-generate": "hf",
    "opt": "opt",
    "opt-kv": "opt-kv",
    "compile": "compile",
    "run-kv": "run-kv",
    "run-mxfp6": "run-mxfp6",
    "eval-kv": "eval-kv",
}
# The file whose presence means the artifact is complete.
ARTIFACT_FILE = {
    "checkpoint": "config.json",
    "export": "model.onnx",
    "hf-generate": "generate.json",
    "opt": "model.kv.onnx",
    "opt-kv": "model.kv.onnx",
    "compile": "command.txt",
    "run-kv": "run.json",
    "run-mxfp6": "run.json",
    "eval-kv": "eval.json",
}


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# checkpoint
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    ones: bool = False  # norms: all ones, else random

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """The tensors of a LlamaForCausalLM checkpoint with ``config``, in file order."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), ones=True),
            TensorSpec(p + "self_attn.q_proj.weight", (q_out, h)),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_out, h)),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_out, h)),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q_out)),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), ones=True),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, h)),
            TensorSpec(p + "mlp.up_proj.weight", (inter, h)),
            TensorSpec(p + "mlp.down_proj.weight", (h, inter)),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), ones=True))
    if not config.get("tie_word_embeddings"):
        specs.append(TensorSpec("lm_head.weight", (config["vocab_size"], h)))
    return specs


def checkpoint_bytes(config: dict[str, Any]) -> int:
    return sum(s.nbytes for s in tensor_specs(config))


def parameter_count(config: dict[str, Any]) -> int:
    return sum(s.numel for s in tensor_specs(config))


def _to_bf16(block: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even like torch's conversion. Values
    here are finite, so the NaN case is not handled. ``block`` is overwritten."""
    bits = block.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits >>= np.uint32(16)
    return bits.astype("<u2")


def weight_std(size: str) -> float:
    return SIZE_WEIGHT_STD.get(size, WEIGHT_STD)


def bf16_chunks(spec: TensorSpec, seed: int, std: float = WEIGHT_STD) -> Iterator[np.ndarray]:
    """The tensor's bf16 bits, ``CHUNK_ELEMENTS`` at a time. The generator is seeded by the
    tensor's name, so one tensor can be regenerated without the others."""
    total = spec.numel
    if spec.ones:
        one = np.uint16(0x3F80)  # 1.0 in bf16
        for start in range(0, total, CHUNK_ELEMENTS):
            yield np.full(min(CHUNK_ELEMENTS, total - start), one, dtype="<u2")
        return
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    for start in range(0, total, CHUNK_ELEMENTS):
        block = rng.standard_normal(min(CHUNK_ELEMENTS, total - start), dtype=np.float32)
        block *= np.float32(std)
        yield _to_bf16(block)


def expected_tensor(spec: TensorSpec, seed: int, std: float = WEIGHT_STD) -> np.ndarray:
    """The float32 values the checkpoint holds for ``spec`` (for checks on small sizes)."""
    bits = np.concatenate(list(bf16_chunks(spec, seed, std))).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(spec.shape)


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The header of a safetensors file: an 8-byte little-endian length, then JSON naming each
    tensor's dtype, shape and [begin, end) byte offsets within the data that follows. The JSON is
    padded with spaces to a multiple of 8 bytes so that the data starts aligned."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_checkpoint(folder: Path, size: str, *, seed: int = 0, shard_gb: float = DEFAULT_SHARD_GB,
                     progress: bool = False) -> dict[str, Any]:
    """Write ``config.json`` and the bf16 safetensors shards (with the index when there are
    several) of ``size`` into ``folder``; return the files and their total size."""
    config = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(config)
    shards = plan_shards(specs, max(1, int(shard_gb * GB)))
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    written = 0
    start = time.perf_counter()
    for name, shard in zip(names, shards):
        with open(folder / name, "wb") as f:
            f.write(_safetensors_header(shard))
            for spec in shard:
                for block in bf16_chunks(spec, seed, weight_std(size)):
                    block.tofile(f)
                written += spec.nbytes
                if progress:
                    rate = written / MB / max(time.perf_counter() - start, 1e-9)
                    print(f"\r  {written / GB:6.2f} / {total / GB:.2f} GB ({rate:.0f} MB/s)", end="", flush=True)
    if progress:
        print(flush=True)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config_out = {k: v for k, v in config.items() if v is not None or k == "rope_scaling"}
    # Written last: its presence marks a complete folder (see ARTIFACT_FILE).
    (folder / "config.json").write_text(json.dumps(config_out, indent=2) + "\n")
    return {"files": names, "tensor_bytes": total, "num_tensors": len(specs)}


def verify_checkpoint(folder: Path, size: str, *, seed: int = 0) -> dict[str, Any]:
    """Load ``folder`` with transformers' ``from_pretrained`` (float32) and check that every
    parameter equals the generated values; the tied head must be the embedding. For small sizes:
    this holds the model in memory."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    state = model.state_dict()
    config = SIZES[size]
    problems = []
    specs = tensor_specs(config)
    for spec in specs:
        got = state.get(spec.name)
        if got is None:
            problems.append(f"{spec.name} not in the loaded model")
        elif tuple(got.shape) != spec.shape or not np.array_equal(got.numpy(), expected_tensor(spec, seed, weight_std(size))):
            problems.append(f"{spec.name} differs from the generated values")
    if config["tie_word_embeddings"]:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            problems.append("lm_head.weight is not tied to the embedding")
    if problems:
        raise BenchError("checkpoint check failed:\n  " + "\n  ".join(problems))
    return {"tensors_checked": len(specs), "parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------

# A tiny launcher starts each stage and reports its time, peak RSS and block writes. Starting
# the stage straight from this process would overstate its RSS: Linux carries the parent's
# peak RSS over fork/vfork + exec into the child's ``ru_maxrss`` (see bench_io.py); the
# launcher's own peak is ~10 MB. A thread samples the child's RSS and kills it past the limit,
# so that a stage too big for the machine fails alone rather than waking the OOM killer, which
# may pick another process.
_LAUNCHER = """
import json, os, signal, subprocess, sys, threading, time
result, limit, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
start = time.perf_counter()
proc = subprocess.Popen(cmd)
state = {"killed": False, "sampled": 0, "done": False}
def rss():
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
def watch():
    while not state["done"]:
        r = rss()
        state["sampled"] = max(state["sampled"], r)
        if limit and r > limit and not state["done"]:
            state["killed"] = True
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            return
        time.sleep(0.1)
threading.Thread(target=watch, daemon=True).start()
_, status, usage = os.wait4(proc.pid, 0)
state["done"] = True
os.sync()
seconds = time.perf_counter() - start
with open(result, "w") as f:
    json.dump({"seconds": seconds, "maxrss": usage.ru_maxrss * 1024, "oublock": usage.ru_oublock,
               "rc": os.waitstatus_to_exitcode(status), "killed": state["killed"],
               "sampled": state["sampled"]}, f)
"""


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def launch(cmd: list[str], log: Path, mem_limit: int) -> dict[str, Any]:
    """Run ``cmd`` under the launcher, output to ``log``; return seconds, peak RSS (bytes), rc,
    block writes and whether the memory watch killed it."""
    with tempfile.TemporaryDirectory(prefix="qeff-bench-scale-run-") as tmp:
        result = Path(tmp) / "result.json"
        with open(log, "wb") as log_file:
            launcher = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), str(mem_limit), *cmd],
                                      stdout=log_file, stderr=subprocess.STDOUT)
        if launcher.returncode != 0 or not result.exists():
            raise BenchError(f"could not launch {cmd[0]} (exit code {launcher.returncode}); see {log}")
        return json.loads(result.read_text())


def tool(name: str) -> list[str]:
    """The console script ``name`` of this interpreter's environment."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found:
        return [found]
    entry = {"qeff": "main", "qeff-opt": "opt_main"}[name]
    return [sys.executable, "-c", f"from qeff.cli import {entry}; {entry}()"]


# Hugging Face generate in a child: float32 like the exported graph, eager attention like the
# export. Decode tokens/s leaves the prefill out: (N - 1) / (t(N tokens) - t(1 token)), as in
# bench_decode.py.
_HF_GENERATE = """
import json, sys, time
import torch, transformers
folder, ids, new, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                          attn_implementation="eager").eval()
load_s = time.perf_counter() - start
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
x = torch.tensor([ids])
def timed(n):
    start = time.perf_counter()
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True)
    return time.perf_counter() - start, y[0, len(ids):].tolist()
timed(1)  # untimed: first-call costs
t1, _ = timed(1)
tn, tokens = timed(new)
rate = (new - 1) / (tn - t1) if new > 1 and tn > t1 else 0.0
with open(out, "w") as f:
    json.dump({"tokens": [tokens], "load_s": load_s, "first_token_s": t1, "generate_s": tn,
               "decode_tokens_per_s": rate}, f)
"""


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.exists() else []


def disk_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take on disk (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in files_under(folder))


def _copy_prefix(src: Path, dst: Path, count: int) -> None:
    """The first ``count`` bytes of ``src`` into ``dst`` with sendfile, the call shutil.copyfile
    itself uses on Linux."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while done < count:
            sent = os.sendfile(fout.fileno(), fin.fileno(), done, min(count - done, 1 << 30))
            if sent == 0:
                break
            done += sent


def copy_baseline(files: list[Path], scratch: Path) -> dict[str, Any]:
    """Time a plain copy of ``files`` into ``scratch`` (until on disk), then remove the copy.
    When the free disk cannot hold all of it, copy as much as fits and scale the time."""
    total = sum(p.stat().st_size for p in files)
    scratch.mkdir(parents=True, exist_ok=True)
    budget = shutil.disk_usage(scratch).free - DISK_MARGIN
    os.sync()
    copied = 0
    start = time.perf_counter()
    for i, src in enumerate(files):
        size = src.stat().st_size
        dst = scratch / f"{i}-{src.name}"
        if copied + size <= budget:
            shutil.copyfile(src, dst)
            copied += size
        else:
            part = max(0, budget - copied)
            if part:
                _copy_prefix(src, dst, part)
                copied += part
            break
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    extrapolated = copied < total
    if extrapolated and copied > 0:
        seconds *= total / copied
    return {"copy_s": seconds if copied else None, "copy_bytes": copied, "copy_extrapolated": extrapolated}


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    """``length`` token ids, seeded, away from the special ids at either end of the vocabulary."""
    rng = np.random.default_rng([seed, 7])
    low, high = min(100, vocab // 4), max(min(vocab - 1, 100000), vocab // 2)
    return rng.integers(low, high, size=length).tolist()


def stage_command(stage: str, work: Path, args: argparse.Namespace, ids: list[int]) -> list[str]:
    d = {name: work / folder for name, folder in ARTIFACTS.items()}
    ids_text = ",".join(map(str, ids))
    if stage == "checkpoint":
        return [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--seed", str(args.seed),
                "--shard-gb", str(args.shard_gb), "--write-checkpoint", str(d["checkpoint"])]
    if stage == "export":
        return tool("qeff") + ["export", str(d["checkpoint"]), "-o", str(d["export"] / "model.onnx"),
                               "--external-data", "--exporter", args.exporter, "--check", args.check]
    if stage == "hf-generate":
        return [sys.executable, "-c", _HF_GENERATE, str(d["checkpoint"]), ids_text, str(args.new_tokens),
                str(d["hf-generate"] / "generate.json")]
    if stage in ("opt", "opt-kv"):
        passes = FULL_PIPELINE if stage == "opt" else KV_PIPELINE
        return tool("qeff-opt") + [str(d["export"] / "model.onnx"), "--passes", passes, "--ctx-len",
                                   str(args.ctx_len), "-o", str(d[stage] / "model.kv.onnx")]
    if stage == "compile":
        return tool("qeff") + ["compile", str(d["opt"] / "model.kv.onnx"), "-o", str(d["compile"]), "--dry-run"]
    if stage in ("run-kv", "run-mxfp6"):
        model = d["opt-kv" if stage == "run-kv" else "opt"] / "model.kv.onnx"
        return tool("qeff") + ["run", str(model), "--input-ids", ids_text, "--max-new-tokens", str(args.new_tokens),
                               "--stats-json", str(d[stage] / "run.json")]
    if stage == "eval-kv":
        from qeff.reference import TOKENIZER

        return tool("qeff") + ["eval", str(d["opt-kv"] / "model.kv.onnx"), "--reference", str(d["export"] / "model.onnx"),
                               "--tokenizer", str(TOKENIZER), "--max-tokens", str(args.eval_tokens), "--window",
                               str(EVAL_WINDOW), "--quiet", "--json", str(d["eval-kv"] / "eval.json")]
    raise ValueError(stage)


def artifact_ready(work: Path, artifact: str) -> bool:
    return (work / ARTIFACTS[artifact] / ARTIFACT_FILE[artifact]).exists()


def remove_artifact(work: Path, artifact: str) -> None:
    shutil.rmtree(work / ARTIFACTS[artifact], ignore_errors=True)


def _log_tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n").splitlines() if log.exists() else []
    return "\n".join(text[-lines:])


def run_stage(stage: str, work: Path, args: argparse.Namespace, ids: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": stage, "status": "skipped", "rc": None, "wall_s": None, "peak_rss_gb": None,
                           "bytes_written": None, "io_write_bytes": None, "copy_s": None, "copy_ratio": None,
                           "copy_extrapolated": False, "disk_gb": None, "free_disk_gb": None,
                           "killed_for_memory": False, "mem_limit_gb": None, "note": ""}
    missing = [a for a in STAGE_INPUTS[stage] if not artifact_ready(work, a)]
    if missing:
        row["note"] = f"input missing: {', '.join(missing)}"
        return row
    out = work / ARTIFACTS[stage]
    shutil.rmtree(out, ignore_errors=True)
    if stage != "compile":  # qeff compile creates its folder
        out.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{stage}.log"
    cmd = stage_command(stage, work, args, ids)
    limit = int(args.mem_limit_gb * GB) if args.mem_limit_gb else int(0.9 * mem_available())
    row.update(cmd=cmd, log=str(log), mem_limit_gb=limit / GB)
    print(f"[{stage}] {' '.join(_short(c) for c in cmd)}", flush=True)
    res = launch(cmd, log, limit)
    written = files_under(out)
    row.update(
        status="ok" if res["rc"] == 0 else "failed",
        rc=res["rc"],
        wall_s=res["seconds"],
        peak_rss_gb=max(res["maxrss"], res["sampled"]) / GB,
        bytes_written=sum(p.stat().st_size for p in written),
        io_write_bytes=res["oublock"] * 512,
        killed_for_memory=res["killed"],
        disk_gb=disk_bytes(work) / GB,
        free_disk_gb=shutil.disk_usage(work).free / GB,
    )
    if res["killed"]:
        row["note"] = f"killed: RSS over the {limit / GB:.1f} GB limit"
    elif res["rc"] != 0:
        row["note"] = f"exit code {res['rc']}; see {log}"
    if row["status"] == "ok" and not artifact_ready(work, stage):
        row.update(status="failed", note=f"{ARTIFACT_FILE[stage]} not written; see {log}")
    if row["status"] == "ok" and row["bytes_written"] >= MIN_RATIO_BYTES:
        row.update(copy_baseline(written, work / "copy"))
        if row["copy_s"]:
            row["copy_ratio"] = row["wall_s"] / row["copy_s"]
    status = row["status"] if not row["note"] else f"{row['status']} ({row['note']})"
    print(f"[{stage}] {status}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB, "
          f"wrote {_human(row['bytes_written'])}", flush=True)
    if row["status"] != "ok":
        print(_log_tail(log), flush=True)
    return row


def _short(arg: str) -> str:
    """Shorten the inline child scripts in the printed command."""
    return "<script>" if "\n" in arg else arg


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GB:
        return f"{n / GB:.2f} GB"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1024:.1f} KB"


def _tokens(work: Path, artifact: str, name: str) -> dict[str, Any] | None:
    path = work / ARTIFACTS[artifact] / name
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    stats = data.get("stats", data)
    return {"tokens": data["tokens"][0], "decode_tokens_per_s": stats.get("decode_tokens_per_s")}


def _agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    same = sum(x == y for x, y in zip(a, b))
    return {"equal": a == b, "same_positions": same, "of": max(len(a), len(b)),
            "first_difference": first if first is not None or len(a) == len(b) else n}


# What a decode step must read at least once: every weight. A memory copy of a buffer far larger
# than the caches is the physical limit of that read on this machine (it reads and writes each
# byte once, so streaming only reads can go somewhat faster than the copy rate).
COPY_PROBE_BYTES = 512 << 20


def copy_bandwidth(nbytes: int = COPY_PROBE_BYTES, repeats: int = 5) -> float:
    """Bytes per second of the best of ``repeats`` copies of an ``nbytes`` buffer (numpy)."""
    source = np.ones(nbytes // 4, np.float32)
    target = np.empty_like(source)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def weight_streaming(results: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """Weight bytes read per second by each decode (tokens/s times the model's weight bytes:
    the fp32 kv model for Hugging Face and ``run-kv``, the rewritten model for ``run-mxfp6``)
    against the measured copy bandwidth."""
    g = results.get("generation") or {}
    written = {row["stage"]: row["bytes_written"] for row in results["stages"] if row["status"] == "ok"}
    out: dict[str, Any] = {"copy_gb_per_s": bandwidth / GB}
    for key, stage in (("hf", "opt-kv"), ("kv", "opt-kv"), ("mxfp6", "opt")):
        rate, size = g.get(f"{key}_decode_tokens_per_s"), written.get(stage)
        if rate and size:
            out[f"{key}_weights_gb_per_s"] = rate * size / GB
            out[f"{key}_of_copy_bandwidth"] = rate * size / bandwidth
    return out


def compare_generation(work: Path) -> dict[str, Any] | None:
    hf = _tokens(work, "hf-generate", "generate.json")
    kv = _tokens(work, "run-kv", "run.json")
    mx = _tokens(work, "run-mxfp6", "run.json")
    if not any((hf, kv, mx)):
        return None
    out: dict[str, Any] = {
        "hf_tokens": hf and hf["tokens"],
        "kv_tokens": kv and kv["tokens"],
        "mxfp6_tokens": mx and mx["tokens"],
        "hf_decode_tokens_per_s": hf and hf["decode_tokens_per_s"],
        "kv_decode_tokens_per_s": kv and kv["decode_tokens_per_s"],
        "mxfp6_decode_tokens_per_s": mx and mx["decode_tokens_per_s"],
        # A model that repeats one token agrees trivially: the count tells whether it does.
        "hf_distinct_tokens": len(set(hf["tokens"])) if hf else None,
        "kv_vs_hf": _agreement(kv["tokens"], hf["tokens"]) if hf and kv else None,
        "mxfp6_vs_hf": _agreement(mx["tokens"], hf["tokens"]) if hf and mx else None,
        "mxfp6_vs_kv": _agreement(mx["tokens"], kv["tokens"]) if kv and mx else None,
    }
    return out


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def default_stages(size: str) -> list[str]:
    gen = {"hf-generate", "opt-kv", "run-kv", "run-mxfp6", "eval-kv"}
    return [s for s in STAGES if size in GENERATION_SIZES or s not in gen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), required=True,
                    help="model shape: 1b (Llama-3.2-1B), 3b (Llama-3.2-3B), 8b (Llama-3-8B) or tiny (tests)")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temp folder, removed at the end)")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--keep", action="store_true",
                    help="keep every stage's output (default: delete it once no later stage needs it)")
    ap.add_argument("--stages", help=f"comma-separated stages to run, in this order: {','.join(STAGES)} "
                                     "(default: all; the generation stages for tiny and 1b only)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and the prompt")
    ap.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_GB, help="largest safetensors shard, GiB")
    ap.add_argument("--ctx-len", type=int, default=256, help="KV cache length for the kv pass")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt length in token ids")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    ap.add_argument("--eval-tokens", type=int, default=160,
                    help="eval-kv: tokens of the reference model's held-out text to score")
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="the export's exporter")
    ap.add_argument("--check", choices=["none", "prefix", "full", "auto"], default="none",
                    help="the export's comparison with torch (qeff export --check)")
    ap.add_argument("--mem-limit-gb", type=float,
                    help="kill a stage whose RSS passes this (default: 90%% of the memory available at its start)")
    ap.add_argument("--verify-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                    help="load the checkpoint with from_pretrained and compare every weight (default: tiny only)")
    ap.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)  # the checkpoint stage's child
    args = ap.parse_args(argv)
    if args.stages is None:
        args.stages = default_stages(args.size)
    else:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STAGES]
        if unknown or not chosen:
            ap.error(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(STAGES)}")
        args.stages = [s for s in STAGES if s in chosen]
    for name in ("shard_gb", "ctx_len", "prompt_len", "new_tokens", "eval_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.prompt_len + args.new_tokens > args.ctx_len:
        ap.error("--prompt-len + --new-tokens must fit in --ctx-len")
    if args.verify_checkpoint is None:
        args.verify_checkpoint = args.size == "tiny"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = SIZES[args.size]
    ids = prompt_ids(config["vocab_size"], args.prompt_len, args.seed)
    results: dict[str, Any] = {
        "size": args.size,
        "config": config,
        "parameters": parameter_count(config),
        "checkpoint_bytes": checkpoint_bytes(config),
        "stages_selected": args.stages,
        "ctx_len": args.ctx_len,
        "passes": FULL_PIPELINE,
        "exporter": args.exporter,
        "check": args.check,
        "prompt_ids": ids,
        "new_tokens": args.new_tokens,
        "stages": [],
    }
    with work_folder(args.workdir, args.keep, "qeff-bench-scale-") as work:
        results["workdir"] = str(work)
        print(f"{args.size}: {results['parameters'] / 1e9:.2f} B parameters, bf16 checkpoint "
              f"{results['checkpoint_bytes'] / GB:.2f} GB, work folder {work}, free disk "
              f"{shutil.disk_usage(work).free / GB:.1f} GB, available memory {mem_available() / GB:.1f} GB, "
              f"export with {args.exporter} (check: {args.check})", flush=True)
        for i, stage in enumerate(args.stages):
            row = run_stage(stage, work, args, ids)
            results["stages"].append(row)
            if stage == "checkpoint" and row["status"] == "ok" and args.verify_checkpoint:
                results["checkpoint_check"] = verify_checkpoint(work / CHECKPOINT_DIR, args.size, seed=args.seed)
                print(f"[checkpoint] from_pretrained loads it; {results['checkpoint_check']['tensors_checked']} "
                      "tensors equal the generated values", flush=True)
            if not args.keep:
                later = {a for s in args.stages[i + 1:] for a in STAGE_INPUTS[s]}
                for done in args.stages[: i + 1]:
                    if done not in later and done not in ("hf-generate", "run-kv", "run-mxfp6", "compile", "eval-kv"):
                        remove_artifact(work, done)
        results["generation"] = compare_generation(work)
        eval_json = work / ARTIFACTS["eval-kv"] / "eval.json"
        results["eval"] = json.loads(eval_json.read_text()) if eval_json.exists() else None
        if results["generation"]:
            results["weight_streaming"] = weight_streaming(results, copy_bandwidth())
        results["peak_disk_gb"] = max((r["disk_gb"] or 0 for r in results["stages"]), default=0)
    return results


def print_table(r: dict[str, Any]) -> None:
    print()
    head = f"{'stage':<13}{'wall s':>9}{'peak RSS GB':>13}{'written':>12}{'copy-ratio':>12}{'disk GB':>9}{'rc':>6}  note"
    print(head)
    for row in r["stages"]:
        wall = f"{row['wall_s']:.1f}" if row["wall_s"] is not None else "-"
        rss = f"{row['peak_rss_gb']:.2f}" if row["peak_rss_gb"] is not None else "-"
        ratio = f"{row['copy_ratio']:.2f}" if row["copy_ratio"] is not None else "-"
        if row["copy_extrapolated"] and row["copy_ratio"] is not None:
            ratio += "*"
        disk = f"{row['disk_gb']:.2f}" if row["disk_gb"] is not None else "-"
        rc = str(row["rc"]) if row["rc"] is not None else "-"
        print(f"{row['stage']:<13}{wall:>9}{rss:>13}{_human(row['bytes_written']):>12}{ratio:>12}{disk:>9}{rc:>6}  "
              f"{row['status'] if row['status'] != 'ok' else ''}{' ' + row['note'] if row['note'] else ''}")
    if any(row["copy_extrapolated"] for row in r["stages"]):
        print("* copy baseline on part of the output (free disk), scaled to its size")
    g = r.get("generation")
    if g:
        print()
        rate = lambda x: f"{x:.2f} tok/s" if x else "-"  # noqa: E731
        print(f"decode: Hugging Face {rate(g['hf_decode_tokens_per_s'])}, qeff run kv {rate(g['kv_decode_tokens_per_s'])}, "
              f"qeff run mxfp6 pipeline {rate(g['mxfp6_decode_tokens_per_s'])}")
        w = r.get("weight_streaming") or {}
        if w:
            streams = ", ".join(f"{name} {w[f'{key}_weights_gb_per_s']:.1f} GB/s ({w[f'{key}_of_copy_bandwidth']:.0%})"
                                for key, name in (("hf", "Hugging Face"), ("kv", "qeff run kv"),
                                                  ("mxfp6", "qeff run mxfp6"))
                                if f"{key}_weights_gb_per_s" in w)
            print(f"weights read per second of decode: {streams or '-'}; memory copy {w['copy_gb_per_s']:.1f} GB/s")
        for key, what in (("kv_vs_hf", "kv model vs Hugging Face"), ("mxfp6_vs_hf", "mxfp6 pipeline vs Hugging Face"),
                          ("mxfp6_vs_kv", "mxfp6 pipeline vs kv model")):
            a = g[key]
            if a:
                same = "same tokens" if a["equal"] else f"differ from token {a['first_difference']}"
                print(f"{what}: {same} ({a['same_positions']}/{a['of']} positions agree)")
        if g["hf_distinct_tokens"] is not None:
            print(f"Hugging Face generated {g['hf_distinct_tokens']} distinct tokens of {len(g['hf_tokens'])}")
    e = r.get("eval")
    if e:
        print(f"qeff eval, kv model vs the plain export on {e['tokens']} held-out tokens ({e['windows']} windows of "
              f"{e['window']}): top-1 agreement {e['top1_agreement']:.2%}, perplexity change "
              f"{e['perplexity_change']:+.2e}, KL max {e['kl_max']:.1e}, {e['seconds']:.1f} s")


def failed(r: dict[str, Any]) -> bool:
    g = r.get("generation") or {}
    kv = g.get("kv_vs_hf")
    e = r.get("eval") or {}
    return (any(row["status"] != "ok" for row in r["stages"]) or (kv is not None and not kv["equal"])
            or (e.get("top1_agreement") is not None and e["top1_agreement"] < 1.0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_checkpoint is not None:
        info = write_checkpoint(args.write_checkpoint, args.size, seed=args.seed, shard_gb=args.shard_gb,
                                progress=sys.stdout.isatty())
        print(f"wrote {len(info['files'])} shard(s), {info['tensor_bytes'] / GB:.2f} GB of bf16 tensors")
        return 0
    try:
        results = run(args)
    except BenchError as e:
        print(f"bench_scale: error: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
