"""kv reads each layer's visibility rule from the export's mask, and refuses one it cannot build.

The sliding-window models themselves are checked against Hugging Face in test_kv.py; here the
classifier is checked against rules written out independently, and a mask no rule describes is
refused by layer, with nothing written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qeff.errors import UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.passes.kv.match import find_attention_sites
from qeff.passes.kv.visibility import classify


def _rule(n, see):
    return np.array([[see(q, k) for k in range(n)] for q in range(n)])


@pytest.mark.parametrize("n", [1, 5, 24])
def test_classify_causal_and_windows(n):
    assert classify(_rule(n, lambda q, k: k <= q)).kind == "causal"
    for w in range(1, n):
        rule = classify(_rule(n, lambda q, k: q - w < k <= q))
        assert (rule.kind, rule.window) == ("window", w)


@pytest.mark.parametrize("n", [2, 7, 24])
def test_classify_chunks(n):
    for c in range(1, n):
        rule = classify(_rule(n, lambda q, k: k <= q and k // c == q // c))  # Llama-4 style
        assert (rule.kind, rule.chunk, str(rule)) == ("chunked", c, f"chunked attention {c}") if c > 1 \
            else rule.kind == "window"  # blocks of one: each query sees itself, a window of 1


def test_classify_other_rules():
    shifted = classify(_rule(12, lambda q, k: k <= q and (k + 1) // 4 == (q + 1) // 4))  # chunks not from 0
    assert shifted.kind == "other" and shifted.detail == "query 3 sees keys [3]"
    assert classify(_rule(6, lambda q, k: True)).detail == "query 0 sees keys [0, 1, 2, 3, 4, 5]"
    assert classify(_rule(6, lambda q, k: k < q)).kind == "other"  # a query that cannot see itself


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_mask_no_rule_describes_is_refused_by_layer(tiny_export, tmp_path, exporter):
    """Layer 1's mask transposed (each query sees the future, not the past): kv refuses it, names
    the layer and what its query 0 sees, and writes nothing."""
    source = tiny_export("llama", exporter=exporter)
    model = ir.load(source)
    site = next(s for s in find_attention_sites(model) if s.layer == 1)
    flipped = ir.node("Transpose", [site.mask], {"perm": [0, 1, 3, 2]})
    model.graph.insert_before(site.mask_node, flipped)
    index = next(i for i, v in enumerate(site.mask_node.inputs) if v is site.mask)
    site.mask_node.replace_input_with(index, flipped.outputs[0])
    out = tmp_path / "kv.onnx"
    with pytest.raises(UnsupportedGraphError, match=r"kv: layer 1: its mask is not causal, a sliding window or chunked: "
                                                     r"query 0 sees keys \[0, 1, 2, 3, 4, 5, 6, 7, …\]"):
        optimize(model, "kv:ctx_len=32", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _explain(monkeypatch, capsys, *args):
    from rich.console import Console

    from qeff import cli
    from tests.cli.test_cli import invoke

    monkeypatch.setattr(cli, "console", Console(width=200))
    return invoke(cli.opt_main, [*map(str, args), "--explain", "kv"], monkeypatch, capsys)


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


@pytest.mark.parametrize("arch,exporter,expected", [
    ("llama", "dynamo", ["core", "4", "2", "16", "0.25", "yes", "causal", "—", "no", "none"]),
    ("mpt", "torchscript", ["core", "4", "4", "16", "0.25", "no", "causal", "—", "no", "ALiBi"]),
    ("gpt2", "dynamo", ["core", "4", "4", "16", "0.25", "no", "causal", "—", "no", "none"]),
])
def test_explain_kv_tables_each_layer_and_writes_nothing(tiny_export, tmp_path, monkeypatch, capsys, arch,
                                                       exporter, expected):
    import shutil

    from qeff.frontend import tiny_config

    source = tmp_path / "m.onnx"
    shutil.copy(tiny_export(arch, exporter=exporter), source)
    code, out, err = _explain(monkeypatch, capsys, source)
    assert code == 0, err
    layers = tiny_config(arch).num_hidden_layers
    assert _rows(out) == [[str(i), *expected] for i in range(layers)]
    assert f"{layers} attention site(s) matched; nothing was rejected" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_explain_kv_shows_a_window_and_a_rejected_layer(tiny_export, tmp_path, monkeypatch, capsys):
    import torch
    import transformers

    from qeff.frontend import export_causal_lm, randomize_parameters, tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 5
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_parameters(model, 0)
    path = export_causal_lm(model.eval(), tmp_path / "sw.onnx", exporter="torchscript", external_data=False,
                            progress=False)
    code, out, err = _explain(monkeypatch, capsys, path, "--ctx-len", "16")
    assert code == 0, err
    assert [row[7] for row in _rows(out)] == ["sliding window 5"] * config.num_hidden_layers

    # layer 1's scores no longer come from a MatMul: it is listed as rejected, with the node
    broken = ir.load(tiny_export("llama"))
    softmax = [n for n in broken.graph if n.op_type == "Softmax"][1]
    odd = ir.node("Sin", [softmax.inputs[0]], name="odd_sin")
    broken.graph.insert_before(softmax, odd)
    softmax.replace_input_with(0, odd.outputs[0])
    ir.save(broken, tmp_path / "broken.onnx")
    code, out, err = _explain(monkeypatch, capsys, tmp_path / "broken.onnx")
    assert code == 0, err
    assert [row[0] for row in _rows(out)] == ["0"]
    assert "1 site(s) matched, 1 rejected" in out
    assert f"rejected: layer 1: Softmax {softmax.name!r}:" in out and "Sin" in out


def test_explain_takes_kv_only(tiny_export, monkeypatch, capsys):
    from qeff import cli
    from tests.cli.test_cli import invoke

    code, out, err = invoke(cli.opt_main, [tiny_export("llama"), "--explain", "fold"], monkeypatch, capsys)
    assert code == 2 and err.strip() == "qeff-opt: error: --explain fold: only kv can be explained — use --explain kv"
