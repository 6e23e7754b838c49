"""Encoders end to end: tiny BERT, RoBERTa and XLM-R for every task, exported, then fixed and
fp16clip, against PyTorch and fp32; padded batches; a local checkpoint folder; the compile
command with defined symbols."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qeff.optimizer import optimize
from qeff.passes.fp16.simulation import run_fp16
from qeff.common.onnxrt import run_model as run_onnxruntime

torch = pytest.importorskip("torch")

from qeff.frontend.encoder import ENCODER_ARCHITECTURES, ENCODER_TASKS, build_tiny_encoder, export_encoder  # noqa: E402

CASES = [(a, t) for a in ENCODER_ARCHITECTURES for t in ENCODER_TASKS]


def _feeds(names: list[str], lengths: list[int], seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A right-padded batch: row r has lengths[r] real tokens."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    feeds = {"input_ids": np.where(mask == 1, rng.integers(3, 512, (len(lengths), seq)), 1),
             "attention_mask": mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = ((np.arange(seq) >= 3) & (mask == 1)).astype(np.int64)
    return {n: feeds[n].astype(np.int64) for n in names}


def _torch_outputs(model, task: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the Hugging Face model computes, with mean pooling for embeddings written here."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    if task == "base":
        return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}
    if task == "qa":
        return {"start_logits": out.start_logits.numpy(), "end_logits": out.end_logits.numpy()}
    if task == "classification":
        return {"logits": out.logits.numpy()}
    hidden = out.last_hidden_state.numpy().astype(np.float64)
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    return {"sentence_embedding": (hidden * mask).sum(1) / mask.sum(1)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    cache = {}

    def get(arch: str, task: str):
        if (arch, task) not in cache:
            model = build_tiny_encoder(arch, task, seed=0)
            cache[arch, task] = (model, export_encoder(model, task, folder / f"{arch}-{task}.onnx"))
        return cache[arch, task]

    return get


@pytest.mark.parametrize("arch,task", CASES)
def test_export_matches_pytorch(exported, arch, task):
    model, result = exported(arch, task)
    assert result.inputs == (["input_ids", "attention_mask", "token_type_ids"] if arch == "bert"
                             else ["input_ids", "attention_mask"])
    feeds = _feeds(result.inputs, [7, 4, 1], 9)
    got, want = run_onnxruntime(result.path, feeds), _torch_outputs(model, task, feeds)
    for name, array in want.items():
        np.testing.assert_allclose(got[name], array, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("arch,task", CASES)
def test_fixed_fp16clip_in_fp16_and_padding(exported, tmp_path, arch, task):
    """After fixed,fp16clip: finite in fp16 simulation and within 1e-2 of fp32; the padded batch
    gives each row's real tokens what that row gives alone."""
    _, result = exported(arch, task)
    rewritten = optimize(result.path, "fixed:symbols=sequence_length,fp16clip", output=tmp_path / "m.onnx")
    assert rewritten.report.passes[-1].details["masks_rewritten"]  # the extended mask became a select
    feeds = _feeds(result.inputs, [9, 5], 9, seed=1)
    fp32, fp16 = run_onnxruntime(result.path, feeds), run_fp16(rewritten.output, feeds)
    for name in fp32:
        assert np.isfinite(fp16[name]).all(), name
        np.testing.assert_allclose(fp16[name], fp32[name], atol=1e-2, rtol=0, err_msg=name)
    alone = run_onnxruntime(rewritten.output, {k: v[1:, :5] for k, v in feeds.items()})
    for name, array in run_onnxruntime(rewritten.output, feeds).items():
        real = array[1, :5] if array.ndim == 3 or (array.ndim == 2 and array.shape[1] == 9) else array[1]
        np.testing.assert_allclose(real, alone[name][0], atol=2e-5, rtol=0, err_msg=name)


def test_local_checkpoint_folder(tmp_path, monkeypatch, capsys):
    """qeff export of a folder saved with save_pretrained: the task head comes from --task."""
    from qeff import cli
    from tests.cli.test_cli import invoke

    model = build_tiny_encoder("bert", "qa", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    code, out, err = invoke(cli.main, ["export", tmp_path / "ckpt", "--task", "qa", "-o", tmp_path / "qa.onnx"],
                            monkeypatch, capsys)
    assert code == 0, err
    feeds = _feeds(["input_ids", "attention_mask", "token_type_ids"], [6, 3], 6)
    got = run_onnxruntime(tmp_path / "qa.onnx", feeds)
    np.testing.assert_allclose(got["start_logits"], _torch_outputs(model, "qa", feeds)["start_logits"], atol=1e-4)


def test_encoder_compile_defines_symbols(exported, tmp_path, monkeypatch):
    """No specializations, no -retained-state, no custom IO: the symbols are defined on the
    command line; the stand-in compiler accepts the command."""
    from qeff.backend_aic import CompileOptions, compile_model
    from tests.backend_aic.standin import write_standin

    _, result = exported("bert", "qa")
    model = optimize(result.path, "fixed:symbols=sequence_length,fp16clip", output=tmp_path / "bert.onnx").output
    options = CompileOptions(batch_size=8, define_symbols={"sequence_length": 128}, multicast_weights=True,
                             stats_batchsize=8, num_cores=14)
    folder = tmp_path / "c"
    dry = compile_model(model, folder, CompileOptions(**{**options.__dict__, "dry_run": True}))
    text = dry.command_text.replace(str(folder.resolve()), "<dir>").replace(str(model.resolve()), "<model>")
    assert text == ("/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=<model> -convert-to-fp16 "
                    "-aic-num-cores=14 -onnx-define-symbol=batch_size,8 -onnx-define-symbol=sequence_length,128 "
                    "-multicast-weights -stats-batchsize=8 -aic-binary-dir=<dir>/qpc")
    assert dry.files == {} and sorted(p.name for p in folder.iterdir()) == ["command.txt", "qeff-compile.json"]
    monkeypatch.setenv("QAIC_COMPILER", str(write_standin(tmp_path / "sdk")))
    assert compile_model(model, tmp_path / "real", options).status == "compiled"
    saved = json.loads((tmp_path / "real" / "qeff-compile.json").read_text())
    assert saved["options"]["define_symbols"] == [["batch_size", 8], ["sequence_length", 128]]
