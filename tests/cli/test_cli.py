"""CLI behaviour: every bad input is one line on stderr, exit code 2, no output, input intact."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qeff import cli
from qeff.passes import as_ir_model, save_model
from tests.graphs import data_file, mlp_model, parse, save, set_external_location


def invoke(main, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [main.__name__, *map(str, args)])
    monkeypatch.setattr(cli._State, "debug", False)
    with pytest.raises(SystemExit) as exc:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _external(tmp_path: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 64] x) => (float[2, 64] y) { y = MatMul(x, w) }
    """
    return save_model(as_ir_model(parse(text, {"w": w})), tmp_path / "m.onnx", external_data=True)


def _not_onnx(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_text("hello, I am a text file\n" * 20)
    return p, ["--passes", "cleanup"]


def _truncated(tmp_path):
    p = save(mlp_model()[0], tmp_path / "m.onnx")
    p.write_bytes(p.read_bytes()[:150])
    return p, ["--passes", "cleanup"]


def _missing_data(tmp_path):
    p = _external(tmp_path)
    data_file(p).unlink()
    return p, ["--passes", "cleanup"]


def _escaping_data(tmp_path):
    p = _external(tmp_path)
    set_external_location(p, "../m.onnx.data")
    return p, ["--passes", "cleanup"]


def _unknown_pass(tmp_path):
    return save(mlp_model()[0], tmp_path / "m.onnx"), ["--passes", "cleanup,foldd"]


def _malformed_option(tmp_path):
    return save(mlp_model()[0], tmp_path / "m.onnx"), ["--passes", "fold:max_elements"]


def _unknown_option(tmp_path):
    return save(mlp_model()[0], tmp_path / "m.onnx"), ["--passes", "fold:max_elems=3"]


def _bad_option_value(tmp_path):
    return save(mlp_model()[0], tmp_path / "m.onnx"), ["--passes", "fold:max_elements=lots"]


def _output_is_input(tmp_path):
    p = save(mlp_model()[0], tmp_path / "m.onnx")
    return p, ["--passes", "cleanup", "-o", p]


def _ctx_len_unused(tmp_path):
    return save(mlp_model()[0], tmp_path / "m.onnx"), ["--passes", "cleanup", "--ctx-len", "128"]


def _verify_unloadable(tmp_path):
    # onnx's helper writes IR version 14 by default; onnxruntime 1.31 loads at most 13.
    proto, _ = mlp_model()
    proto.ir_version = 99
    return save(proto, tmp_path / "m.onnx"), ["--passes", "cleanup", "--verify"]


_ENCODER = """<ir_version: 10, opset_import: ["" : 18]>
    g (float[batch_size, sequence_length] x) => (float[batch_size, sequence_length] y) { y = Relu(x) }"""


def _fixed_undeclared_symbol(tmp_path):
    return save(parse(_ENCODER), tmp_path / "m.onnx"), ["--passes", "fixed"]


def _fixed_misspelt_size(tmp_path):
    return save(parse(_ENCODER), tmp_path / "m.onnx"), ["--passes", "fixed:sequense_length=8"]


def _missing_file(tmp_path):
    return tmp_path / "nothing.onnx", ["--passes", "cleanup"]


BAD_INPUTS = {
    "not onnx": (_not_onnx, "not a valid ONNX model|empty ONNX model"),
    "truncated": (_truncated, "not a valid ONNX model|truncated"),
    "missing external data": (_missing_data, "missing"),
    "data escapes folder": (_escaping_data, "outside the model's folder"),
    "unknown pass": (_unknown_pass, "unknown pass 'foldd' — did you mean 'fold'"),
    "malformed option": (_malformed_option, "malformed option"),
    "unknown option": (_unknown_option, "has no option 'max_elems'"),
    "bad option value": (_bad_option_value, "expected an integer"),
    "output is input": (_output_is_input, "would overwrite the input"),
    "ctx-len unused": (_ctx_len_unused, "no pass in the list takes it"),
    "missing file": (_missing_file, "no such file"),
    "fixed: undeclared symbol": (_fixed_undeclared_symbol, "not a specialization symbol .* fixed:symbols=sequence_length"),
    "fixed: misspelt size": (_fixed_misspelt_size, "no 'sequense_length' dimension .* did you mean 'sequence_length'"),
    "verify cannot load": (_verify_unloadable, "onnxruntime cannot load"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    make, fragment = BAD_INPUTS[case]
    model, args = make(tmp_path)
    before = _tree_digest(tmp_path)
    code, out, err = invoke(cli.opt_main, [model, *args], monkeypatch, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qeff-opt: error:")
    import re

    assert re.search(fragment, lines[0]), lines[0]
    assert "Traceback" not in err
    assert _tree_digest(tmp_path) == before  # no output file, input untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    p, args = _unknown_pass(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qeff-opt", str(p), *args, "--debug"])
    from qeff.errors import PassOptionError

    with pytest.raises(PassOptionError):
        cli.opt_main()


def test_success_writes_model_manifest_and_report(tmp_path, monkeypatch, capsys):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    code, out, err = invoke(
        cli.opt_main,
        [src, "--passes", "cleanup,fold", "--report", tmp_path / "r.json", "--verify"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "m.cleanup.fold.onnx").exists()  # the default output name
    assert (tmp_path / "m.cleanup.fold.qeff.json").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold"]
    assert report["verification"]["passed"]
    assert "passed" in out and "cleanup" in out


def test_list_passes(monkeypatch, capsys):
    code, out, _ = invoke(cli.opt_main, ["--list-passes"], monkeypatch, capsys)
    assert code == 0
    assert "cleanup" in out and "fold" in out and "max_elements" in out


def test_qeff_opt_subcommand_matches(tmp_path, monkeypatch, capsys):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    code, _, err = invoke(cli.main, ["opt", src, "-p", "cleanup", "-o", tmp_path / "o.onnx", "-q"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "o.onnx").exists()
    code, _, err = invoke(cli.main, ["opt", src, "-p", "nope"], monkeypatch, capsys)
    assert code == 2 and err.startswith("qeff: error:")


def test_export_argument_errors(tmp_path, monkeypatch, capsys):
    code, _, err = invoke(cli.main, ["export", "-o", tmp_path / "x.onnx"], monkeypatch, capsys)
    assert code == 2 and "either a model folder or --tiny" in err
    code, _, err = invoke(cli.main, ["export", "--tiny", "llama", "--exporter", "jit"], monkeypatch, capsys)
    assert code == 2 and "unknown exporter" in err
    code, _, err = invoke(cli.main, ["export", "--tiny", "llama", "--opset", "17", "-o", tmp_path / "x.onnx"],
                          monkeypatch, capsys)
    assert code == 2 and "opset 18 or later" in err and "torchscript" in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(monkeypatch, capsys):
    code, _, err = invoke(cli.opt_main, ["--no-such-flag"], monkeypatch, capsys)
    assert code == 2 and "No such option" in err


def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for script in ("qeff-opt", "qeff"):
        done = subprocess.run([bindir / script, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout


def test_export_then_opt_from_the_command_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "gpt2.onnx"
    code, stdout, err = invoke(cli.main, ["export", "--tiny", "gpt2", "-o", out], monkeypatch, capsys)
    assert code == 0, err
    assert "onnxruntime vs torch: max abs logits difference" in stdout
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["input_ids", "attention_mask", "position_ids"]
    code, _, err = invoke(cli.opt_main, [out, "-p", "cleanup,fold", "--verify", "-q"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "gpt2.cleanup.fold.onnx").exists()


def test_export_unknown_architecture(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    code, _, err = invoke(cli.main, ["export", "--tiny", "bloom", "-o", tmp_path / "b.onnx"], monkeypatch, capsys)
    assert code == 2 and "bloom" in err and "llama" in err
    assert list(tmp_path.iterdir()) == []


def _table_rows(out: str, title: str) -> list[list[str]]:
    """The body rows of a rich table printed (unwrapped) under ``title``, as lists of cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def test_demo_runs_the_flow(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from rich.console import Console

    from qeff.verify import greedy_reference

    # Wide enough that no table cell wraps, so the printed tokens can be read back.
    monkeypatch.setattr(cli, "console", Console(width=300))
    demo = tmp_path / "demo"
    code, out, err = invoke(
        cli.main, ["demo", "--workdir", demo, "--arch", "gpt2", "--ctx-len", "32", "--passes", "cleanup,fold,kv"],
        monkeypatch, capsys
    )
    assert code == 0, err
    assert "3. verified: KV model vs the original graph" in out
    report = json.loads((demo / "report.json").read_text())
    assert report["verification"]["passed"]
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold", "kv"]
    assert report["passes"][1]["nodes_after"] < report["passes"][0]["nodes_before"]
    assert report["passes"][2]["details"]["ctx_len"] == 32

    # The generation table: recompute the reference here from the printed prompts, with the
    # original export, and compare it with what the demo printed for the KV model.
    assert "greedy generation on the CPU, 12 new tokens: OrtSession + generate on the rewritten model in fp32 (ctx_len 32" in out
    rows = _table_rows(out, "generation")
    assert len(rows) == 2
    prompts = [[int(t) for t in row[1].split()] for row in rows]
    printed_kv = [[int(t) for t in row[2].split()] for row in rows]
    printed_ref = [[int(t) for t in row[3].split()] for row in rows]
    assert [len(p) for p in prompts] == [6, 3]
    expected = greedy_reference(demo / "tiny-gpt2.onnx", prompts, 12)[0]
    assert printed_kv == expected
    assert printed_ref == expected
    assert [row[4] for row in rows] == ["✓", "✓"]
    assert "tokens agree with the fp32 reference: 24/24" in out
    assert "TTFT" in out and "tokens/s" in out and "KV bytes copied 0" in out
    # Last, a dry-run compile: the files and the command for the Cloud AI compiler.
    assert "5. dry-run compile: wrote custom_io.yaml, specializations.json" in out
    command = (demo / "compile" / "command.txt").read_text().strip()
    assert command in out and command.startswith("/opt/qti-aic/exec/qaic-compile -aic-hw -aic-hw-version=ai100 -m=")
    assert json.loads((demo / "compile" / "specializations.json").read_text())["specializations"][1] == {
        "batch_size": "1", "seq_len": "1", "ctx_len": "32"}


def test_demo_default_pipeline(tmp_path, monkeypatch, capsys):
    """The default demo: the reference model through kv, fixed, fp16clip and mxfp6, verified on the
    held-out text; decoded continuations for fp32, fp16 and the full pipeline; a quality table;
    a dry-run compile with -mxfp6-matmul. The fp32 continuation is recomputed here with torch."""
    import io

    torch = pytest.importorskip("torch")
    from rich.console import Console
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from qeff.demo_reference import NEW_TOKENS, PROMPTS, run_reference_demo
    from qeff.reference import CHECKPOINT, TOKENIZER

    console = Console(file=io.StringIO(), width=400)
    demo = tmp_path / "demo"
    result = run_reference_demo(workdir=demo, console=console)
    out = console.file.getvalue()
    report = json.loads((demo / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold", "kv", "fixed", "fp16clip", "mxfp6"]
    quality = report["verification"]["quality"]
    assert report["verification"]["passed"] and quality["passed"] and quality["top1_agreement"] > 0.93

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    model = LlamaForCausalLM.from_pretrained(CHECKPOINT).eval()
    fp32, fp16, full = result["continuations"]
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        assert fp32.tokens[i] == new  # the fp32 export says what torch says
        assert fp16.tokens[i] == new  # and so does the fp16 model in fp16 simulation
        for row in (fp32, fp16, full):  # each decoded continuation is on screen, line breaks as ↵
            assert row.texts[i] == tokenizer.decode(row.tokens[i])
            assert row.texts[i].replace("\n", "↵") in out
    assert fp16.label == "fp16 model (fp16 simulation)" and full.label == "full pipeline (fp16 simulation)"
    assert f"fp16 model (fp16 simulation): {2 * NEW_TOKENS}/{2 * NEW_TOKENS} tokens equal" in out
    same = sum(a == b for g, r in zip(full.tokens, fp32.tokens) for a, b in zip(g, r))
    assert f"full pipeline (fp16 simulation): {same}/{2 * NEW_TOKENS} tokens equal" in out
    assert "5. quality on the held-out split (5,508 tokens; qeff eval)" in out
    labels = [label for label, _ in result["quality"]]
    assert labels == ["fp32 export", "fp16 model", "full pipeline"]
    assert result["quality"][2][1].top1_agreement == pytest.approx(quality["top1_agreement"], abs=1e-12)
    command = (demo / "compile" / "command.txt").read_text()
    assert "-mxfp6-matmul" in command and "-convert-to-fp16" in command


def test_demo_without_kv_skips_generation(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    demo = tmp_path / "demo"
    # --ctx-len with a pipeline that does not take it is refused before anything is exported.
    code, out, err = invoke(
        cli.main, ["demo", "--workdir", demo, "--arch", "llama", "--passes", "cleanup,fold", "--ctx-len", "32"],
        monkeypatch, capsys
    )
    assert code == 2 and "--ctx-len" in err and out == ""
    assert not demo.exists()

    code, out, err = invoke(
        cli.main, ["demo", "--workdir", demo, "--arch", "gpt2", "--passes", "cleanup,fold"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "3. verified: same inputs: max abs difference" in out
    assert "greedy generation" not in out and "generation" not in out.replace("qeff demo", "")
    report = json.loads((demo / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold"]


def test_kv_verify_from_the_command_line(tiny_export, tmp_path, monkeypatch, capsys):
    out = tmp_path / "llama.kv.onnx"
    code, stdout, err = invoke(
        cli.opt_main, [tiny_export("llama"), "--passes", "kv", "--ctx-len", "40", "--verify", "-o", out],
        monkeypatch, capsys,
    )
    assert code == 0, err
    assert "greedy tokens agree 32/32" in " ".join(stdout.split())
    manifest = json.loads((tmp_path / "llama.kv.qeff.json").read_text())
    assert manifest["ctx_len"] == 40
    assert manifest["retained_state"] == [
        f"past_{k}.{i}_RetainedState" for i in range(2) for k in ("key", "value")]
    assert manifest["kv"]["n_kv_heads"] == 2


def test_kv_verify_failure_writes_nothing(tiny_export, tmp_path, monkeypatch, capsys):
    """A tolerance below the float32 noise of the rewrite makes --verify fail: exit 2, one
    line naming the token agreement, no model written."""
    out = tmp_path / "llama.kv.onnx"
    code, _, err = invoke(
        cli.opt_main,
        [tiny_export("llama"), "--passes", "kv", "--ctx-len", "40", "--verify", "--tolerance", "1e-12", "-o", out],
        monkeypatch, capsys,
    )
    assert code == 2
    assert "--verify failed: greedy tokens agree" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "llama.kv.qeff.json").exists()


def test_fixed_bound_decode_verifies_by_generation(tiny_export, tmp_path, monkeypatch, capsys):
    """kv then fixed bound to one decode specialization: --verify generates with the static
    model (batch 1, one token per call, prefill included) against the original graph."""
    out = tmp_path / "llama.decode.onnx"
    code, stdout, err = invoke(
        cli.opt_main,
        [tiny_export("llama"), "--passes", "kv:ctx_len=40,fixed:batch_size=1,seq_len=1,ctx_len=40", "--verify", "-o", out],
        monkeypatch, capsys,
    )
    assert code == 0, err
    assert "greedy tokens agree 16/16" in " ".join(stdout.split())
    manifest = json.loads((tmp_path / "llama.decode.qeff.json").read_text())
    assert manifest["fixed"]["bound"] == {"batch_size": 1, "seq_len": 1, "ctx_len": 40}


def test_kv_fp16clip_verifies_in_fp16_simulation(tiny_export, tmp_path, monkeypatch, capsys):
    """With fp16clip in the pipeline --verify generates with the fp16 simulation of the KV model:
    finite, tokens agree, logits within 1e-2 of the largest reference logit."""
    out = tmp_path / "llama.fp16.onnx"
    report = tmp_path / "r.json"
    code, stdout, err = invoke(
        cli.opt_main,
        [tiny_export("llama"), "--passes", "kv:ctx_len=40,fp16clip", "--verify", "-o", out, "--report", report],
        monkeypatch, capsys,
    )
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "fp16 simulation, finite" in text and "of the largest reference value" in text
    verification = json.loads(report.read_text())["verification"]
    assert "fp16 simulation" in verification["method"] and verification["tolerance"] == 1e-2
    assert 0 < verification["max_rel"] <= 1e-2  # fp16 rounding shows, within the tolerance


def test_mx_verify_reports_quantization_instead_of_failing(tiny_export, tmp_path, monkeypatch, capsys):
    """An MX pass changes the numbers by design: --verify reports tokens and logits and passes
    unless they break; an explicit --tolerance makes it a hard check again."""
    out = tmp_path / "llama.mx.onnx"
    args = [tiny_export("llama"), "--passes", "kv:ctx_len=40,mxfp6,mxint8kv", "--verify", "-o", out]
    code, stdout, err = invoke(cli.opt_main, args, monkeypatch, capsys)
    assert code == 0, err
    assert "quantized model, reported" in " ".join(stdout.split())
    manifest = json.loads((tmp_path / "llama.mx.qeff.json").read_text())
    assert manifest["mx"]["compiler_flag"] == "-mxfp6-matmul" and manifest["kv"]["precision"] == "mxint8"
    out.unlink()
    code, _, err = invoke(cli.opt_main, args + ["--tolerance", "1e-6"], monkeypatch, capsys)
    assert code == 2 and "--verify failed" in err and not out.exists()


def test_mx_error_table_and_plot(tiny_export, tmp_path, monkeypatch, capsys):
    """mxfp6 prints the per-weight SQNR table and --plot draws it; --plot without an MX pass
    is refused before anything runs."""
    plot = tmp_path / "errors.png"
    code, stdout, err = invoke(
        cli.opt_main, [tiny_export("llama"), "--passes", "mxfp6", "-o", tmp_path / "m.onnx", "--plot", plot],
        monkeypatch, capsys)
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "mxfp6: per-weight error" in text and "m.lm_head.weight" in text and "SQNR dB" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    code, _, err = invoke(cli.opt_main, [tiny_export("llama"), "--passes", "cleanup", "-o", tmp_path / "c.onnx",
                                         "--plot", tmp_path / "x.png"], monkeypatch, capsys)
    assert code == 2 and "no" in err and "MX pass" in err and not (tmp_path / "c.onnx").exists()
