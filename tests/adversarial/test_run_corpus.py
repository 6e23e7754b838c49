"""The adversarial corpus for ``qeff run``: a KV model with ctx_len 8, driven with what does not
fit it. Each case is refused before any call, in one line, exit 2, with nothing written."""

from __future__ import annotations

import re

import pytest

from qeff import cli
from qeff.optimizer import optimize
from tests.adversarial.test_corpus import invoke, tree

PROMPT8 = "17,301,5,88,412,9,250,33"


@pytest.fixture(scope="module")
def kv8(tiny_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv8")
    optimize(tiny_export("llama"), "kv:ctx_len=8", output=folder / "kv8.onnx")
    return folder / "kv8.onnx"


CASES = {
    "prefill above ctx_len": (["--input-ids", PROMPT8, "--prefill-len", "9", "--max-new-tokens", "1"],
                              "prefill length 9 is above ctx_len 8"),
    "negative id": (["--input-ids", "5,-9,3"], "-9"),
    "id beyond the vocabulary": (["--input-ids", "5,512,3"], "512"),
    "id beyond int64": (["--input-ids", "5,99999999999999999999999"], "99999"),
    "id in exponent form": (["--input-ids", "5,1e23"], "not a list of integers"),
    "prompt longer than ctx_len": (["--input-ids", PROMPT8 + ",7"], "does not fit"),
    "new tokens beyond ctx_len": (["--input-ids", PROMPT8, "--max-new-tokens", "2"], "do not fit ctx_len 8"),
    "max-new-tokens 0": (["--input-ids", "5", "--max-new-tokens", "0"], "--max-new-tokens"),
    "top-p nan": (["--input-ids", "5", "--temperature", "1", "--top-p", "nan"], "--top-p"),
    "stats-json is the model": (["--input-ids", "5", "--stats-json", "MODEL"], "would overwrite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_refuses_in_one_line(case, kv8, monkeypatch, capsys):
    args, fragment = CASES[case]
    args = [str(kv8) if a == "MODEL" else a for a in args]
    before = tree(kv8.parent)
    code, _, err = invoke(cli.main, ["run", kv8, *args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qeff: error:"), err
    assert re.search(re.escape(fragment), lines[0]), lines[0]
    assert tree(kv8.parent) == before
