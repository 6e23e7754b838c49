"""qeff latency-stats: files written here from known samples give the percentiles NumPy computes
from the same samples; --keep-middle drops each file's edges; malformed files are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qeff import cli
from tests.cli.test_cli import invoke

COLUMNS = ["hostRoundTripUs", "enqTimeUs", "execTotalUs", "totalRoundtripTimeUs"]


def _write(path, samples: np.ndarray, extra_column: bool = False):
    """A latency file in the runner's layout: four header lines, then the CSV (µs, space-padded)."""
    names = ["Sample", "queueDepth", "numInfInQueue", *COLUMNS] + (["execToCompleteUs"] if extra_column else [])
    lines = ["Qaic runner latency profile", "program: 0", "activation: 0", "units: us", ", ".join(names)]
    for i, row in enumerate(samples):
        values = [str(i), "3", "1", *(f"{v:.3f}" for v in row)] + (["N/A"] if extra_column else [])
        lines.append(",  ".join(values))
    path.write_text("\n".join(lines) + "\n")
    return path


def _expected(samples_us: np.ndarray) -> dict[str, list[float]]:
    ms = np.round(samples_us, 3) / 1000.0  # the file holds three decimals of µs
    out = {}
    for j, name in enumerate(COLUMNS):
        col = ms[:, j]
        out[name[:-2]] = [col.mean(), col.min(), *np.percentile(col, [50, 75, 90, 95, 99]), col.max()]
    return out


def test_percentiles_of_combined_files_are_numpys(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(7)
    a = rng.gamma(4.0, 500.0, size=(137, len(COLUMNS)))
    b = rng.gamma(2.0, 900.0, size=(61, len(COLUMNS)))
    files = [_write(tmp_path / "aic-profiling-program-0-latency.txt", a),
             _write(tmp_path / "aic-profiling-program-1-latency.txt", b, extra_column=True)]
    out_json = tmp_path / "stats.json"
    code, out, err = invoke(cli.main, ["latency-stats", *files, "--json", out_json], monkeypatch, capsys)
    assert code == 0, err
    expected = _expected(np.vstack([a, b]))
    stats = json.loads(out_json.read_text())["stats_ms"]
    assert set(stats) == set(expected)  # execToComplete holds only N/A: left out
    for name, values in expected.items():
        got = [stats[name][k] for k in ("mean", "min", "50%", "75%", "90%", "95%", "99%", "max")]
        assert got == pytest.approx(values, rel=1e-12, abs=1e-12)
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name)
        assert line.split()[1:] == [f"{v:.3f}" for v in values]
    assert "198 inferences" in out


def test_keep_middle_drops_the_edges_of_each_file(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    a = rng.uniform(100, 200, size=(40, len(COLUMNS)))
    b = rng.uniform(300, 400, size=(20, len(COLUMNS)))
    a[:3] = 1e6  # warm-up outliers at the start
    files = [_write(tmp_path / "a.txt", a), _write(tmp_path / "b.txt", b)]
    out_json = tmp_path / "stats.json"
    code, out, err = invoke(cli.main, ["latency-stats", *files, "--keep-middle", "80", "--json", out_json],
                            monkeypatch, capsys)
    assert code == 0, err
    # 80 % of 40 keeps rows 4..35, of 20 rows 2..17 (as many dropped at each end).
    expected = _expected(np.vstack([a[4:36], b[2:18]]))
    stats = json.loads(out_json.read_text())["stats_ms"]
    assert stats["totalRoundtripTime"]["max"] == pytest.approx(expected["totalRoundtripTime"][-1])
    assert stats["hostRoundTrip"]["50%"] == pytest.approx(expected["hostRoundTrip"][2])
    assert json.loads(out_json.read_text())["inferences"] == 48


MALFORMED = {
    "short": ("one\ntwo\nthree\n", "no table after the 4 header lines"),
    "no header": ("a\nb\nc\nd\n1, 2, 3\n", "is not the table's header"),
    "no latency column": ("a\nb\nc\nd\nSample, queueDepth\n0, 1\n", "no latency column"),
    "cut row": ("a\nb\nc\nd\nSample, queueDepth, numInfInQueue, totalRoundtripTimeUs\n0, 1, 1\n", "has 3 fields"),
    "text value": ("a\nb\nc\nd\nSample, queueDepth, numInfInQueue, totalRoundtripTimeUs\n0, 1, 1, fast\n",
                   "totalRoundtripTimeUs is 'fast', not a number"),
    "no rows": ("a\nb\nc\nd\nSample, queueDepth, numInfInQueue, totalRoundtripTimeUs\n", "has a header but no inference"),
    "binary": (b"\xff\xfe\x00garbage", "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_file_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    content, message = MALFORMED[case]
    path = tmp_path / "lat.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, out, err = invoke(cli.main, ["latency-stats", path], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_missing_file_and_bad_keep_middle(tmp_path, monkeypatch, capsys):
    code, _, err = invoke(cli.main, ["latency-stats", tmp_path / "none.txt"], monkeypatch, capsys)
    assert code == 2 and "does not exist" in err
    path = _write(tmp_path / "a.txt", np.full((3, len(COLUMNS)), 5.0))
    code, _, err = invoke(cli.main, ["latency-stats", path, "--keep-middle", "0"], monkeypatch, capsys)
    assert code == 2 and "--keep-middle" in err and len(err.strip().splitlines()) == 1
