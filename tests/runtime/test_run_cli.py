"""``qeff run``: a local tokenizer the test writes, streaming text, stats; token ids; errors."""

from __future__ import annotations

import json

import pytest

from qeff import cli
from qeff.optimizer import optimize
from qeff.verify import greedy_reference
from tests.cli.test_cli import invoke


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer over the tiny models' 512 ids: word ``w<i>`` is id i for i >= 2;
    ``<unk>`` is 0 and ``</s>`` (EOS) is 1 (special tokens must not occur inside other words)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, 512)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kv_model(tiny_export, tmp_path_factory):
    return optimize(tiny_export("llama"), "kv:ctx_len=40", output=tmp_path_factory.mktemp("run") / "kv.onnx").output


def test_prompt_streams_text_and_prints_stats(tiny_export, kv_model, tokenizer_dir, tmp_path, monkeypatch, capsys):
    prompt = [5, 9, 3, 7, 100, 42]
    expected = greedy_reference(tiny_export("llama"), [prompt], 10)[0][0]
    if 1 in expected:  # </s> is EOS: generation stops there
        expected = expected[:expected.index(1) + 1]
    stats = tmp_path / "stats.json"
    code, out, err = invoke(cli.main, ["run", kv_model, "--tokenizer", tokenizer_dir, "--prompt",
                                       " ".join(f"w{t}" for t in prompt), "--max-new-tokens", "10",
                                       "--stats-json", stats], monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(f"w{t}" for t in expected if t != 1)
    assert text in " ".join(out.split())
    assert "TTFT" in out and "decode" in out and "tokens/s" in out and "end to end" in out
    saved = json.loads(stats.read_text())
    assert saved["tokens"] == [expected] and saved["stats"]["generated_tokens"] == len(expected)


def test_input_ids_batch(tiny_export, kv_model, monkeypatch, capsys):
    prompts = [[5, 9, 3], [8, 8]]
    expected = greedy_reference(tiny_export("llama"), prompts, 6)[0]
    code, out, err = invoke(cli.main, ["run", kv_model, "--input-ids", "5,9,3", "--input-ids", "8 8",
                                       "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0, err
    assert f"[0] {' '.join(map(str, expected[0]))}" in out and f"[1] {' '.join(map(str, expected[1]))}" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt", "w5 w6"], "need --tokenizer"),
    ([], "give --prompt"),
    (["--input-ids", "5,x"], "not a list of integers"),
    (["--input-ids", "5", "--temperature", "-1"], "temperature"),
])
def test_errors(kv_model, monkeypatch, capsys, args, message):
    code, _, err = invoke(cli.main, ["run", kv_model, *args], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err
