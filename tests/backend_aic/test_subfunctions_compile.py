"""backend_aic with an outlined model: ``qeff compile --dry-run`` passes ``-sub-functions`` when
the manifest lists the model's layer functions, and not otherwise."""

from __future__ import annotations

from qeff import cli
from qeff.optimizer import optimize
from tests.cli.test_cli import invoke


def test_dry_run_of_an_outlined_kv_model_has_sub_functions(tiny_export, tmp_path, monkeypatch, capsys):
    plain = tiny_export("llama")
    outlined = optimize(plain, "kv:ctx_len=128,subfunctions", output=tmp_path / "sf.onnx").output
    flat = optimize(plain, "kv:ctx_len=128", output=tmp_path / "flat.onnx").output
    code, out, err = invoke(cli.main, ["compile", outlined, "-o", tmp_path / "c", "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    command = (tmp_path / "c" / "command.txt").read_text().split()
    assert "-sub-functions" in command and "-retained-state" in command
    code, out, err = invoke(cli.main, ["compile", flat, "-o", tmp_path / "f", "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert "-sub-functions" not in (tmp_path / "f" / "command.txt").read_text().split()
