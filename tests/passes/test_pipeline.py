from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import onnx_ir as ir
import pytest

from qeff.errors import PassOptionError, PassSequenceError
from qeff.optimizer import optimize
from qeff.passes import PASS_REGISTRY, QeffPass, parse_pipeline
from qeff.passes.infra.base import describe_options, parse_option_value
from qeff.passes.infra.pipeline import build_passes, validate_sequence
from tests.graphs import mlp_model, save


@dataclasses.dataclass(frozen=True)
class _ProbeOptions:
    count: int = 1
    ratio: float = 0.5
    enabled: bool = True
    mode: Literal["even", "nearest"] = "even"
    limit: Optional[int] = None
    skip: tuple[str, ...] = ()


class _ProbePass(QeffPass):
    """A pass used only to test option parsing and ordering rules."""

    name = "t_probe"
    summary = "test pass"
    Options = _ProbeOptions

    def call(self, model):
        return ir.passes.PassResult(model, modified=False)


class _OncePass(_ProbePass):
    name = "t_once"
    once = True


class _NeedsPass(_ProbePass):
    name = "t_needs"
    requires_passes = ("t_once",)


@pytest.fixture(autouse=True, scope="module")
def _unregister_test_passes():
    yield
    for name in ("t_probe", "t_once", "t_needs"):
        PASS_REGISTRY.pop(name, None)


def test_grammar_groups_options_with_their_pass():
    specs = parse_pipeline("kv, fixed:seq_len=1,batch_size=1 ,fp16clip,mxfp6:block=32,rounding=even")
    assert [(s.name, s.options) for s in specs] == [
        ("kv", {}),
        ("fixed", {"seq_len": "1", "batch_size": "1"}),
        ("fp16clip", {}),
        ("mxfp6", {"block": "32", "rounding": "even"}),
    ]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "empty"),
        ("block=32,mxfp6", "before any pass"),
        ("fold:max_elements", "malformed option"),
        ("fold:max_elements=1,max_elements=2", "given twice"),
        ("Fold!", "not a pass name"),
    ],
)
def test_grammar_errors(text, fragment):
    with pytest.raises(PassOptionError, match=fragment):
        parse_pipeline(text)


def test_typed_options_are_converted():
    (p,) = build_passes(parse_pipeline("t_probe:count=3,ratio=0.25,enabled=no,mode=nearest,limit=none,skip=a|b"))
    assert p.options == _ProbeOptions(count=3, ratio=0.25, enabled=False, mode="nearest", limit=None, skip=("a", "b"))
    (p,) = build_passes(parse_pipeline("t_probe:limit=7"))
    assert p.options.limit == 7


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("t_probe:count=three", "expected an integer"),
        ("t_probe:enabled=maybe", "expected true or false"),
        ("t_probe:mode=odd", "expected one of even, nearest"),
        ("t_probe:cnt=1", "did you mean 'count'"),
        ("t_probx", "did you mean 't_probe'"),
    ],
)
def test_bad_options_and_names(text, fragment):
    with pytest.raises(PassOptionError, match=fragment):
        build_passes(parse_pipeline(text))


def test_override_applies_only_where_the_option_exists():
    passes = build_passes(parse_pipeline("t_probe,cleanup"), {"count": "5"})
    assert passes[0].options.count == 5
    with pytest.raises(PassOptionError, match="no pass in the list takes it"):
        build_passes(parse_pipeline("cleanup"), {"ctx_len": "128"})


def test_explicit_option_beats_override():
    (p,) = build_passes(parse_pipeline("t_probe:count=2"), {"count": "5"})
    assert p.options.count == 2


def test_order_rules():
    once, needs = build_passes(parse_pipeline("t_once,t_needs"))
    validate_sequence([once, needs])
    with pytest.raises(PassSequenceError, match="needs 't_once' to run before it"):
        validate_sequence([needs, once])
    with pytest.raises(PassSequenceError, match="listed twice"):
        validate_sequence([once, once])
    with pytest.raises(PassSequenceError, match="already applied"):
        validate_sequence([once], [{"name": "t_once"}])
    validate_sequence([needs], [{"name": "t_once"}])


def test_history_travels_with_the_model(tmp_path):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    first = optimize(src, "t_once", tmp_path / "a.onnx")
    assert first.manifest.passes[0]["name"] == "t_once"
    with pytest.raises(PassSequenceError, match="already applied"):
        optimize(first.output, "t_once", tmp_path / "b.onnx")
    second = optimize(first.output, "t_needs", tmp_path / "b.onnx")
    # The manifest beside the input is carried forward.
    assert [p["name"] for p in second.manifest.passes] == ["t_once", "t_needs"]
    assert second.output == tmp_path / "b.onnx" and second.output.exists()


def test_describe_options_lists_types_and_defaults():
    rows = {r[0]: r for r in describe_options(_ProbePass)}
    assert rows["mode"][1] == "even|nearest" and rows["mode"][2] == "even"
    assert rows["limit"][1] == "int | none"


def test_parse_option_value_rejects_unsupported_types():
    with pytest.raises(ValueError):
        parse_option_value("x", dict)
