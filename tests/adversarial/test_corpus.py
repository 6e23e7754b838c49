"""The adversarial corpus: crafted inputs a hostile but realistic user gives the command line.

Every case builds its input here and asserts the documented refusal: exit code 2, one line on
stderr without a traceback, every file in the folder byte-identical afterwards (inputs,
protected outputs, nothing new, no staging left). Security cases also assert that no byte of a
file outside the model's folder appears in any file written.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff import cli
from qeff.passes import as_ir_model, save_model
from tests.graphs import TWO_MATMULS, data_file, mlp_model, parse, save

# Bytes no model contains: found in an output, they can only have come from the outside file.
SECRET = b"QEFF-SECRET-" + hashlib.sha256(b"outside").hexdigest().encode() * 4


def invoke(main: Callable[[], None], args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [main.__name__, *map(str, args)])
    monkeypatch.setattr(cli._State, "debug", False)
    with pytest.raises(SystemExit) as exc:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and its hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def secret_file(tmp_path: Path) -> Path:
    """A file outside the model's folder (``tmp_path/work``), with unique bytes."""
    path = tmp_path / "outside.bin"
    path.write_bytes(SECRET * 8)
    return path


def _constant_model(location: str, *, in_subgraph: bool = False, in_function: bool = False) -> onnx.ModelProto:
    """y = x + c, with c a Constant node whose tensor is external data at ``location``."""
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[16])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        tensor.external_data.add(key=key, value=value)
    constant = helper.make_node("Constant", [], ["c"], value=tensor)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    functions = []
    if in_subgraph:
        branch = helper.make_graph([constant], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [16])])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["c2"])], "else", [],
                                  [helper.make_tensor_value_info("c2", TensorProto.FLOAT, [16])])
        flag = helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("f", TensorProto.BOOL, [], [True]))
        nodes = [flag, helper.make_node("If", ["flag"], ["c"], then_branch=branch, else_branch=other),
                 helper.make_node("Add", ["x", "c"], ["y"])]
    elif in_function:
        body = helper.make_function("local", "AddC", ["a"], ["b"], [constant, helper.make_node("Add", ["a", "c"], ["b"])],
                                    [helper.make_opsetid("", 18)])
        functions = [body]
        nodes = [helper.make_node("AddC", ["x"], ["y"], domain="local")]
    else:
        nodes = [constant, helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("local", 1)] if in_function else [])
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


def _mlp(work: Path) -> Path:
    return save(mlp_model()[0], work / "m.onnx")


def _external(work: Path) -> Path:
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((64, 64)).astype(np.float32), "w2": rng.standard_normal((64, 64)).astype(np.float32)}
    return save_model(as_ir_model(parse(TWO_MATMULS, w)), work / "m.onnx", external_data=True)


# ------------------------------------------------------------------------------------------
# Reading files the user did not give
# ------------------------------------------------------------------------------------------

OUTSIDE = {
    "constant ../": dict(location="../outside.bin"),
    "constant absolute": dict(location="ABSOLUTE"),
    "constant in a subgraph": dict(location="../outside.bin", in_subgraph=True),
    "constant in a function": dict(location="../outside.bin", in_function=True),
    "constant via a symlink": dict(location="link.bin"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
@pytest.mark.parametrize("passes", ["fold", "cleanup,fold"])
def test_no_tensor_reads_outside_the_model_folder(case, passes, tmp_path, monkeypatch, capsys):
    secret = secret_file(tmp_path)
    work = _work(tmp_path)
    options = dict(OUTSIDE[case])
    if options["location"] == "ABSOLUTE":
        options["location"] = str(secret)
    if options["location"] == "link.bin":
        (work / "link.bin").symlink_to(secret)
    model = save(_constant_model(**options), work / "m.onnx")
    before = tree(work)
    code, out, err = invoke(cli.opt_main, [model, "--passes", passes, "-o", work / "o.onnx"], monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "external data" in lines[0], err
    assert re.search("outside the model's folder|absolute path", lines[0])
    assert tree(work) == before
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_bytes()


def test_a_manifest_cannot_name_a_file_outside(tmp_path, monkeypatch, capsys):
    secret_file(tmp_path)
    work = _work(tmp_path)
    model = _mlp(work)
    (work / "m.qeff.json").write_text(json.dumps({"format": "qeff-manifest/1", "node_precision_info": "../outside.bin"}))
    before = tree(work)
    code, _, err = invoke(cli.opt_main, [model, "--passes", "cleanup", "-o", work / "o.onnx"], monkeypatch, capsys)
    assert code == 2 and "node_precision_info" in err and len(err.strip().splitlines()) == 1, err
    assert tree(work) == before


def test_side_files_in_an_input_manifest_are_never_written(tmp_path, monkeypatch, capsys):
    work = _work(tmp_path)
    model = _mlp(work)
    crafted = {"format": "qeff-manifest/1", "side_files": {"node_precision_info": [".onnx", "EVIL"]}}
    (work / "m.qeff.json").write_text(json.dumps(crafted))
    code, _, err = invoke(cli.opt_main, [model, "--passes", "cleanup", "-o", work / "o.onnx"], monkeypatch, capsys)
    assert code == 0, err
    for path in work.iterdir():
        if path.name != "m.qeff.json":
            assert b"EVIL" not in path.read_bytes()
    onnx.checker.check_model(str(work / "o.onnx"))


# ------------------------------------------------------------------------------------------
# Losing data: no output option may name a file the run reads or writes
# ------------------------------------------------------------------------------------------

def _protected_targets(work: Path, model: Path) -> dict[str, Path]:
    return {"the input": model, "its data": data_file(model), "its manifest": work / "m.qeff.json",
            "the output": work / "o.onnx"}


@pytest.mark.parametrize("target", ["the input", "its data", "its manifest", "the output"])
def test_report_cannot_overwrite_a_file_of_the_run(target, tmp_path, monkeypatch, capsys):
    work = _work(tmp_path)
    model = _external(work)
    (work / "m.qeff.json").write_text(json.dumps({"format": "qeff-manifest/1"}))
    (work / "o.onnx").write_bytes(b"an earlier output")
    before = tree(work)
    args = [model, "--passes", "cleanup", "-o", work / "o.onnx", "--report", _protected_targets(work, model)[target]]
    code, _, err = invoke(cli.opt_main, args, monkeypatch, capsys)
    assert code == 2 and "would overwrite" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree(work) == before


def test_plot_cannot_overwrite_the_report(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    work = _work(tmp_path)
    model = _mlp(work)
    args = [model, "--passes", "mxfp6", "-o", work / "o.onnx", "--report", work / "r.png", "--plot", work / "r.png"]
    before = tree(work)
    code, _, err = invoke(cli.opt_main, args, monkeypatch, capsys)
    assert code == 2 and "--plot" in err and "would overwrite" in err, err
    assert tree(work) == before


def test_run_and_bench_json_cannot_overwrite_the_model(tmp_path, monkeypatch, capsys):
    work = _work(tmp_path)
    model = _external(work)
    before = tree(work)
    for args in (["run", model, "--input-ids", "1,2", "--stats-json", data_file(model)],
                 ["bench", model, "--json", model], ["bench", model, "--json", data_file(model)]):
        code, _, err = invoke(cli.main, args, monkeypatch, capsys)
        assert code == 2 and "would overwrite" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert tree(work) == before


# ------------------------------------------------------------------------------------------
# One line, exit 2
# ------------------------------------------------------------------------------------------

def _graph(nodes, inputs, outputs) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=10)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _cycle(work):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["b"], ["y"])]
    return save(_graph(nodes, [_vi("x", [2])], [_vi("y", [2])]), work / "m.onnx"), ["--passes", "cleanup"]


def _self_loop(work):
    nodes = [helper.make_node("Add", ["x", "a"], ["a"], name="loop"), helper.make_node("Identity", ["a"], ["y"])]
    return save(_graph(nodes, [_vi("x", [2])], [_vi("y", [2])]), work / "m.onnx"), ["--passes", "fold"]


def _non_utf8(work):
    raw = _graph([helper.make_node("Relu", ["x"], ["y"], name="NAME")], [_vi("x", [2])], [_vi("y", [2])])
    path = work / "m.onnx"
    path.write_bytes(raw.SerializeToString().replace(b"NAME", b"\xff\xfe\xfd\xfc"))
    return path, ["--passes", "cleanup"]


def _no_outputs(work):
    return save(_graph([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], []), work / "m.onnx"), \
        ["--passes", "cleanup", "--verify"]


def _huge_dim(work):
    model = _graph([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2**62, 4])], [_vi("y", [2**62, 4])])
    return save(model, work / "m.onnx"), ["--passes", "cleanup", "--verify"]


def _parent_is_a_file(work):
    return _mlp(work), ["--passes", "cleanup", "-o", work / "m.onnx" / "o.onnx"]


def _name_too_long(work):
    return _mlp(work), ["--passes", "cleanup", "-o", work / ("n" * 300 + ".onnx")]


def _report_into_missing_folder(work):
    return _mlp(work), ["--passes", "cleanup", "-o", work / "o.onnx", "--report", work / "nope" / "r.json"]


def _with(args):
    return lambda work: (_mlp(work), args)


def _manifest(text):
    def make(work):
        model = _mlp(work)
        (work / "m.qeff.json").write_text(text)
        return model, ["--passes", "cleanup", "-o", work / "o.onnx"]
    return make


def _external_past_its_file(work):
    model = _external(work)
    proto = onnx.load(str(model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**12)
    onnx.save(proto, str(model))
    return model, ["--passes", "cleanup"]


ONE_LINE = {
    "cycle": (_cycle, "has a cycle through node 'add'|has a cycle through node 'relu'"),
    "self-loop": (_self_loop, "has a cycle through node 'loop'"),
    "non-UTF-8 name": (_non_utf8, "not valid UTF-8"),
    "no outputs": (_no_outputs, "no graph outputs"),
    "2**62 dim under --verify": (_huge_dim, "input 'x' declares shape"),
    "output parent is a file": (_parent_is_a_file, "is a file, not a folder"),
    "output name over 255 bytes": (_name_too_long, "longer than"),
    "report into a missing folder": (_report_into_missing_folder, "does not exist"),
    "block=1e23": (_with(["--passes", "mxfp6:block=1e23"]), "block"),
    "tolerance -1": (_with(["--passes", "cleanup", "--verify", "--tolerance", "-1"]), "--tolerance"),
    "tolerance nan": (_with(["--passes", "cleanup", "--verify", "--tolerance", "nan"]), "--tolerance"),
    "ctx-len 1e20": (_with(["--passes", "cleanup", "--ctx-len", "99999999999999999999"]), "--ctx-len"),
    "manifest is a list": (_manifest("[1, 2]"), "is a list, not an object"),
    "manifest with text for a number": (_manifest('{"format": "qeff-manifest/1", "ctx_len": "lots"}'), "ctx_len"),
    "manifest not JSON": (_manifest("{"), "cannot be read as JSON"),
    "data offset past the file": (_external_past_its_file, "does not hold"),
}


@pytest.mark.parametrize("case", list(ONE_LINE))
def test_qeff_opt_refuses_in_one_line(case, tmp_path, monkeypatch, capsys):
    make, fragment = ONE_LINE[case]
    work = _work(tmp_path)
    model, args = make(work)
    before = tree(work)
    code, _, err = invoke(cli.opt_main, [model, *args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qeff-opt: error:"), err
    assert re.search(fragment, lines[0]), lines[0]
    assert tree(work) == before


QEFF_ONE_LINE = {
    "demo --workdir is a file": (lambda work: ["demo", "--workdir", _mlp(work)], "is a file"),
    "bench --duration nan": (lambda work: ["bench", _mlp(work), "--duration", "nan"], "--duration"),
    "run --seed -1": (lambda work: ["run", _mlp(work), "--input-ids", "1", "--seed", "-1"], "--seed"),
    "run --temperature nan": (lambda work: ["run", _mlp(work), "--input-ids", "1", "--temperature", "nan"],
                              "--temperature"),
    "run --prefill-len -1": (lambda work: ["run", _mlp(work), "--input-ids", "1", "--prefill-len", "-1"],
                             "--prefill-len"),
    "run --ctx-len -1": (lambda work: ["run", _mlp(work), "--input-ids", "1", "--ctx-len", "-1"], "--ctx-len"),
    "run --device-id -1": (lambda work: ["run", _mlp(work), "--input-ids", "1", "--device-id", "-1"], "--device-id"),
    "compile --timeout nan": (lambda work: ["compile", _mlp(work), "-o", work / "c", "--timeout", "nan"], "--timeout"),
    "compile --timeout -1": (lambda work: ["compile", _mlp(work), "-o", work / "c", "--timeout", "-1"], "--timeout"),
    "missing argument": (lambda work: ["run"], "Missing argument"),
}


@pytest.mark.parametrize("case", list(QEFF_ONE_LINE))
def test_qeff_refuses_in_one_line(case, tmp_path, monkeypatch, capsys):
    make, fragment = QEFF_ONE_LINE[case]
    work = _work(tmp_path)
    args = make(work)
    before = tree(work)
    code, _, err = invoke(cli.main, args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qeff: error:"), err
    assert re.search(re.escape(fragment), lines[0]), lines[0]
    assert tree(work) == before


def test_a_proto_given_to_optimize_is_not_modified(tmp_path):
    from qeff import optimize

    proto = parse("""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[4] x) => (float[4] y) { c = Constant<value = float[4] {1, 2, 3, 4}>() y = Add(x, c) }""")
    before = proto.SerializeToString()
    optimize(proto, "cleanup,fold", tmp_path / "o.onnx")
    assert proto.SerializeToString() == before
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.node[0].attribute[0].t), [1, 2, 3, 4])
