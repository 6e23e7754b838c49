"""``qeff eval`` and ``qeff export --reference`` from the command line, and ``--verify`` of a lossy
pipeline on the held-out text; bad input gets one line and exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest

from qeff import cli
from tests.cli.test_cli import invoke

pytestmark = pytest.mark.slow


def test_eval_json_and_table(reference_onnx, rewritten, monkeypatch, capsys):
    code, out, err = invoke(cli.main, ["eval", rewritten("kv"), "--reference", reference_onnx, "--json", "-"],
                            monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "kv" and data["reference_kind"] == "plain"
    assert data["text"] == "the reference model's held-out split" and data["tokens"] == 5508
    assert data["top1_agreement"] == 1.0 and abs(data["perplexity_change"]) < 1e-6
    code, out, err = invoke(cli.main, ["eval", reference_onnx, "--max-tokens", "600", "--window", "64"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert "qeff eval — 584 tokens" in out and "perplexity" in out  # 600 - 16 of context


def test_export_reference_records_its_checkpoint(tmp_path, monkeypatch, capsys):
    """The export names the checkpoint in its metadata, which is how eval finds the tokenizer
    of a model in another folder."""
    import onnx

    from qeff.contract import CHECKPOINT_METADATA
    from qeff.reference import CHECKPOINT

    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(cli.main, ["export", "--reference", "--exporter", "torchscript", "--check", "none"],
                            monkeypatch, capsys)
    assert code == 0, err
    props = {p.key: p.value for p in onnx.load(tmp_path / "reference.onnx", load_external_data=False).metadata_props}
    assert props[CHECKPOINT_METADATA] == str(CHECKPOINT)
    code, out, err = invoke(cli.main, ["export", "--reference", "--tiny", "llama"], monkeypatch, capsys)
    assert code == 2 and "--reference is a model of its own" in err


def test_verify_of_a_lossy_pipeline_measures_it_on_the_text(reference_onnx, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.onnx"
    report = tmp_path / "r.json"
    code, stdout, err = invoke(cli.opt_main, [reference_onnx, "--passes", "mxfp4", "--verify", "-o", out,
                                              "--report", report], monkeypatch, capsys)
    assert code == 2 and "--verify failed: on 5,508 tokens of the reference model's held-out split" in err
    assert "top-1 agreement is 8" in err and "(limit 90%)" in err and not out.exists()
    quality = json.loads(report.read_text())["verification"]["quality"]
    assert not quality["passed"] and quality["top1_agreement"] < 0.9  # measured 82 %
    code, stdout, err = invoke(cli.opt_main, [reference_onnx, "--passes", "mxfp4", "-o", out,
                                              "--min-top1-agreement", "0.75"], monkeypatch, capsys)
    assert code == 0, err
    assert "top-1 agreement 8" in stdout and "(limit 75%) — passed" in stdout and out.exists()
    code, stdout, err = invoke(cli.opt_main, [reference_onnx, "--passes", "mxfp6", "-o", out, "--verify",
                                              "--max-perplexity-increase", "0"], monkeypatch, capsys)
    # mxfp6 changes the perplexity by +0.01 %: above a limit of 0
    assert code == 2 and "limit +0.0%" in err


def test_verify_text_file_uses_the_tokenizer_beside_the_model(reference_onnx, tmp_path, monkeypatch, capsys):
    from qeff.reference import TOKENIZER, heldout_text

    folder = tmp_path / "m"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copy(reference_onnx, model)
    for data in reference_onnx.parent.glob(reference_onnx.name + "*.data"):
        shutil.copy(data, folder / data.name)  # the model names its data file
    text = tmp_path / "text.txt"
    text.write_text(heldout_text()[:4000])
    code, stdout, err = invoke(cli.opt_main, [model, "--passes", "mxint8", "--verify-text", text, "-o",
                                              folder / "out.onnx"], monkeypatch, capsys)
    assert code == 0, err  # found through the export's checkpoint metadata
    assert "tokens of text.txt" in stdout and "passed" in stdout
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    code, stdout, err = invoke(cli.main, ["eval", model, "--text", text, "--json", "-"], monkeypatch, capsys)
    assert code == 0, err and json.loads(stdout)["tokenizer"] == str(folder / "tokenizer.json")


def _bad(monkeypatch, capsys, *args):
    code, out, err = invoke(cli.main, ["eval", *map(str, args)], monkeypatch, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_gets_one_line(reference_onnx, rewritten, tiny_export, tiny_bert_export, tmp_path, monkeypatch,
                                 capsys):
    from qeff.reference import TOKENIZER

    short = tmp_path / "short.txt"
    short.write_text("A short text of a few tokens.")
    assert "shorter than one window of 128 tokens" in _bad(monkeypatch, capsys, reference_onnx, "--text", short)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Déjà vu, naïve café. ".encode("latin-1") * 50)
    assert "is not UTF-8 text (byte 0xe9 at offset 1)" in _bad(monkeypatch, capsys, reference_onnx, "--text", latin)
    tiny = tiny_export("llama")  # random tiny llama: no tokenizer anywhere, another vocabulary
    assert "no tokenizer for llama.onnx" in _bad(monkeypatch, capsys, tiny)
    err = _bad(monkeypatch, capsys, tiny, "--reference", reference_onnx, "--tokenizer", TOKENIZER)
    assert "has a vocabulary of" in err and "cannot be compared" in err
    assert "no tokenizer at" in _bad(monkeypatch, capsys, reference_onnx, "--tokenizer", tmp_path)
    assert "does not exist" in _bad(monkeypatch, capsys, tmp_path / "missing.onnx")
    assert "has no logits output, so it is not a causal LM" in _bad(monkeypatch, capsys, tiny_bert_export,
                                                                     "--tokenizer", TOKENIZER)
    assert "context 64 must be at least 1 and below the window of 64" in _bad(
        monkeypatch, capsys, reference_onnx, "--window", "64", "--context", "64")
    # a KV model built for 128 positions sees windows of at most 129 tokens
    assert "a window of 400 tokens is longer than the model takes (129)" in _bad(
        monkeypatch, capsys, rewritten("kv"), "--window", "400")

