"""qeff bench, qeff run and qeff demo --encoder on encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qeff import cli
from qeff.common.onnxrt import run_model as run_onnxruntime
from tests.cli.test_cli import invoke
from tests.runtime.test_run_cli import tokenizer_dir

__all__ = ["tokenizer_dir"]  # a fixture, imported for pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert_qa(tmp_path_factory):
    from qeff.frontend.encoder import build_tiny_encoder, export_encoder

    folder = tmp_path_factory.mktemp("bert")
    return export_encoder(build_tiny_encoder("bert", "qa"), "qa", folder / "bert-qa.onnx").path


def test_bench_reports_every_batch_size_and_instance_count(bert_qa, tmp_path, monkeypatch, capsys):
    out_json = tmp_path / "bench.json"
    code, out, err = invoke(cli.main, ["bench", bert_qa, "--batch-size", "1,4", "--instances", "1,2",
                                       "--duration", "0.3", "--seq-len", "16", "--json", out_json], monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["batch_size"], r["instances"]) for r in rows] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    for r in rows:
        assert r["calls"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["inferences_per_s"] == pytest.approx(r["calls"] * r["batch_size"] / r["seconds"])
    assert "inferences/s" in out and "p99 ms" in out


def test_run_an_encoder_on_a_text_file(bert_qa, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """Each line of the file is one row of a right-padded batch; the printed positions are the
    argmax of what onnxruntime computes for that row alone."""
    text = tmp_path / "inputs.txt"
    text.write_text("w5 w9 w3 w7 w100\nw8 w8\n")
    code, out, err = invoke(cli.main, ["run", bert_qa, "--tokenizer", tokenizer_dir, "--text-file", text],
                            monkeypatch, capsys)
    assert code == 0, err
    for row, ids in enumerate([[5, 9, 3, 7, 100], [8, 8]]):
        feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
                 "token_type_ids": np.zeros((1, len(ids)), np.int64)}
        alone = run_onnxruntime(bert_qa, feeds)
        assert f"[{row}] most likely position {int(np.argmax(alone['start_logits'][0]))}" in out
    assert "start_logits (2, 5)" in out and "end_logits (2, 5)" in out


def test_demo_encoder(tmp_path, monkeypatch, capsys):
    code, out, err = invoke(cli.main, ["demo", "--encoder", "--workdir", tmp_path / "d"], monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "verified: fp16 simulation, finite" in text and "inferences/s" in text
    command = (tmp_path / "d" / "compile" / "command.txt").read_text()
    assert "-onnx-define-symbol=sequence_length,128" in command and "-multicast-weights" in command
    assert "-retained-state" not in command and "custom-IO" not in command
