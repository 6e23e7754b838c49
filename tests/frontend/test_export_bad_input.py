"""``qeff export FOLDER`` on a checkpoint that does not fit its config, and on a disk that fills up.

Each case goes through the command line: one line on stderr, exit code 2, no file left in the
output folder, the checkpoint untouched. The full disk is simulated twice: a write that raises
ENOSPC (in process), and a real child process under a file-size limit, whose writes fail with
EFBIG as they would on a full file system.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qeff import cli  # noqa: E402
from tests.cli.test_cli import invoke  # noqa: E402

pytestmark = pytest.mark.slow


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama whose embedding and MLP weights are above the size that is loaded for real,
    so that the export streams them."""
    import transformers

    from qeff.frontend.tiny import tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 128, 256
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("ckpt") / "hf"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "hf"
    target.mkdir()
    for p in folder.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


def _export_refused(folder, tmp_path, monkeypatch, capsys, *fragments):
    before = _digest(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = invoke(cli.main, ["export", folder, "-o", out_dir / "m.onnx", "--no-check"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    assert _digest(folder) == before
    return lines[0]


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        # More layers than the checkpoint holds: the first weight of the extra layer is missing.
        ({"num_hidden_layers": 3}, ["no tensor 'model.layers.2."]),
        # A wider model than the weights: every matrix has the wrong shape; the first is named.
        ({"hidden_size": 256}, ["has shape [", "the model expects ["]),
        ({"vocab_size": 1000}, ["'model.embed_tokens.weight' has shape [", "the model expects [1000, 128]"]),
    ],
    ids=["layers", "hidden", "vocab"],
)
def test_a_config_that_does_not_match_the_weights(checkpoint, tmp_path, monkeypatch, capsys, fields, fragments):
    folder = _copy(checkpoint, tmp_path)
    _edit_config(folder, **fields)
    _export_refused(folder, tmp_path, monkeypatch, capsys, *fragments)


def test_a_full_disk_while_writing_the_weights(checkpoint, tmp_path, monkeypatch, capsys):
    folder = _copy(checkpoint, tmp_path)
    real_pwrite = os.pwrite
    calls = []

    def pwrite_until_full(fd, data, position):
        calls.append(len(data))
        if len(calls) > 3:  # a few chunks land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    line = _export_refused(folder, tmp_path, monkeypatch, capsys, "No space left on device", "free disk space")
    assert len(calls) > 3, line  # the failure came from the weight writes, not before them


def _limit_file_size(limit: int):
    def apply() -> None:
        # A write past the limit then fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_in_a_real_process(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    before = _digest(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", "from qeff.entry import main; main()", "export", str(folder),
         "-o", str(out_dir / "m.onnx"), "--no-check"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(64 << 10),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "File too large" in lines[0], done.stderr
    assert not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    assert _digest(folder) == before


def test_a_state_space_model_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """Mamba's layers keep a recurrent state, not a KV cache: refused before any export (the
    export used to run and fail inside onnxruntime's check with an internal error)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "mamba"
    config = transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
    transformers.MambaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    capsys.readouterr()  # save_pretrained's progress bar
    _export_refused(folder, tmp_path, monkeypatch, capsys, "'mamba' in", "has state-space, recurrent or convolution "
                    "layers, not only attention", "not supported")


def test_a_hybrid_layer_list_is_refused_by_name(checkpoint, tmp_path, monkeypatch, capsys):
    """A config whose layer_types name anything but attention (a hybrid) is refused, naming it."""
    folder = _copy(checkpoint, tmp_path)
    _edit_config(folder, layer_types=["full_attention", "linear_attention"])
    _export_refused(folder, tmp_path, monkeypatch, capsys, "has linear_attention layers, not only attention")
    _edit_config(folder, layer_types=["full_attention", "sliding_attention"])  # attention only: accepted
    code, _, err = invoke(cli.main, ["export", folder, "-o", tmp_path / "ok.onnx", "--no-check"], monkeypatch, capsys)
    assert code == 0, err
