"""Search spaces: both published formats parse to what they say, bad ones are one line and exit 2.

``data/bert_base_dopt.json`` is the tuning guide's example verbatim (quic/cloud-ai-sdk,
tutorials/NLP/Performance-Tuning-Beginner, the older format); ``data/resnet_base_dopt_throughput.json``
is the newer format's example from the same repository (tutorials/Computer-Vision), CRLF line
ends and all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qeff import cli
from qeff.errors import QeffError
from qeff.tune.space import load_space, parse_space
from tests.cli.test_cli import invoke

DATA = Path(__file__).parent / "data"


def test_the_tuning_guides_example_parses():
    space = load_space(DATA / "bert_base_dopt.json", backend="aic", total_cores=14)
    assert space.source_format == "old" and space.objective == "max-throughput" and space.max_evals == 200
    assert dict(space.values) == {"cores": tuple(range(1, 15)), "mos": tuple(range(1, 9)), "ols": tuple(range(1, 9)),
                                  "batch-size": (1, 2, 4, 8, 16), "instances": tuple(range(1, 15))}
    assert space.fixed == {"set-size": 1}
    assert [(p["cores"], p["instances"]) for p in space.initial] == [(1, 14), (2, 7), (4, 3), (7, 2), (14, 1)]
    assert all((p["mos"], p["ols"], p["batch-size"]) == (1, 1, 1) for p in space.initial)
    # Counted here: (cores, instances) pairs that fit 14 cores, times mos, ols and 5 batch sizes.
    pairs = sum(1 for c in range(1, 15) for a in range(1, 15) if c * a <= 14)
    assert space.grid_size() == pairs * 8 * 8 * 5


def test_the_newer_format_parses():
    space = load_space(DATA / "resnet_base_dopt_throughput.json", backend="aic", total_cores=14)
    assert space.source_format == "new" and space.objective == "max-throughput" and not space.exhaustive
    assert space.values["set-size"] == tuple(range(1, 11)) and space.values["batch-size"] == (1, 2, 4, 8, 16)
    assert space.fixed == {} and len(space.initial) == 5
    assert space.initial[1] == {"cores": 2, "mos": 1, "ols": 1, "batch-size": 1, "instances": 7, "set-size": 1}


def test_objective_names_of_both_formats_and_the_override():
    doc = json.loads((DATA / "bert_base_dopt.json").read_text())
    for name, expected in (("minimize_latency", "min-latency"), ("min-latency", "min-latency"),
                           ("maximize_inf_rate", "max-throughput")):
        assert parse_space({**doc, "objective": name}, total_cores=14).objective == expected
    assert parse_space(doc, total_cores=14, objective="min-latency").objective == "min-latency"


def test_static_parameters_and_defaults():
    doc = {"objective": "min-latency", "params": {"cores": {"min": 1, "max": 4}},
           "initial_values": [{"cores": 2}], "static_params": {"ols": 2, "bs": 8}}
    space = parse_space(doc, total_cores=16)
    assert space.config({"cores": 3}) == {"cores": 3, "mos": None, "ols": 2, "batch-size": 8, "instances": 1,
                                          "set-size": 1}
    cpu = parse_space({"objective": "max-throughput", "search-parameters": {"instances": {"min": 1, "max": 4}},
                       "initial-values": [{"instances": 2}]}, backend="cpu", total_cores=8)
    # Threads not searched: the cores shared between the instances.
    assert cpu.config({"instances": 3}) == {"batch-size": 1, "instances": 3, "threads": 2, "opt-level": 3}


def _old(**changes):
    doc = json.loads((DATA / "bert_base_dopt.json").read_text())
    for key, value in changes.items():
        doc[key] = value
    return doc


def _with_param(name, bounds):
    doc = _old()
    doc["params"] = {**doc["params"], name: bounds}
    return doc


BAD = {
    "min above max": (_with_param("ols", {"min": 5, "max": 2}), "params.ols: min 5 is above max 2"),
    "unknown parameter": (_with_param("mxfp6", {"min": 0, "max": 1}), "unknown parameter 'mxfp6' for the aic backend"),
    "cores over the card": (_with_param("cores", {"min": 1, "max": 20}), "cores 20 is out of range"),
    "start over the card": (_old(initial_values=[{"cores": 4, "mos": 1, "ols": 1, "bs": 1, "instances": 5}]),
                            "cores 4 × instances 5 is more than the 16 cores available"),
    "missing max": (_with_param("mos", {"min": 1}), "params.mos has no 'max'"),
    "missing start value": (_old(initial_values=[{"cores": 1}]), "has no value for mos, ols, batch-size, instances"),
    "no starts": ({k: v for k, v in _old().items() if k != "initial_values"}, "the search space has no initial_values"),
    "no objective": ({k: v for k, v in _old().items() if k != "objective"}, "the search space has no objective"),
    "unknown objective": (_old(objective="fastest"), "unknown objective 'fastest'"),
    "batch not a power of two": (_with_param("bs", {"min": 1, "max": 12}), "must be powers of two"),
    "fraction": (_with_param("ols", {"min": 1, "max": 2.5}), "params.ols.max must be a whole number, got 2.5"),
    "unknown key": (_old(max_evals=3), "unknown key 'max_evals'"),
    "start outside": (_old(initial_values=[{"cores": 1, "mos": 9, "ols": 1, "bs": 1, "instances": 1}]),
                      "mos 9 is outside the searched values 1..8"),
    "not an object": ([1, 2], "the search space must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_space_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    doc, message = BAD[case]
    with pytest.raises(QeffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(doc, total_cores=16)
    path = tmp_path / "space.json"
    path.write_text(json.dumps(doc))
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read before the space is checked")
    code, out, err = invoke(cli.main, ["tune", model, "--space", path, "--dry-run"], monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_not_json_and_the_cpu_backends_parameters(tmp_path, monkeypatch, capsys):
    path = tmp_path / "space.json"
    path.write_text("{ \"params\": ")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    code, _, err = invoke(cli.main, ["tune", model, "--space", path], monkeypatch, capsys)
    assert code == 2 and "is not JSON" in err and len(err.strip().splitlines()) == 1
    # AI cores mean nothing to onnxruntime: the seed's space is refused by the cpu backend.
    code, _, err = invoke(cli.main, ["tune", model, "--space", DATA / "bert_base_dopt.json", "--backend", "cpu",
                                     "--total-cores", 16], monkeypatch, capsys)
    assert code == 2 and "unknown parameter 'cores' for the cpu backend" in err
