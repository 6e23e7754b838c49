"""Pass option bounds: one check, met by ``name:key=value`` text and by ``Pass(Options(...))``."""

from __future__ import annotations

import dataclasses
import sys
import typing

import numpy as np
import onnx_ir as ir
import pytest

from qeff import cli
from qeff.errors import PassOptionError
from qeff.passes import PASS_REGISTRY, describe_options, parse_pipeline
from qeff.passes.fixed import FixedPass
from qeff.passes.fold import FoldPass
from qeff.passes.fp16.fp16clip import FP16ClipPass
from qeff.passes.infra.pipeline import build_passes
from qeff.passes.kv.kv_pass import KVPass
from qeff.passes.mx.kv import MXINT8KVPass
from qeff.passes.mx.weights import MXFP6Pass
from tests.graphs import TWO_MATMULS, mlp_model, parse, save

INT32_MAX = 2**31 - 1


def _build(text: str):
    return build_passes(parse_pipeline(text))


@pytest.mark.parametrize(
    "text,message",
    [
        ("kv:ctx_len=99999999999999999999", "kv: option ctx_len=99999999999999999999 must be at least 1 and at most 2147483647"),
        ("kv:ctx_len=0", "kv: option ctx_len=0 must be at least 1 and at most 2147483647"),
        ("kv:ctx_len=2147483648", "kv: option ctx_len=2147483648 must be at least 1 and at most 2147483647"),
        ("kv:prefill_len=0", "kv: option prefill_len=0 must be at least 1 and at most 2147483647"),
        ("kv:full_batch_size=-2", "kv: option full_batch_size=-2 must be at least 1 and at most 2147483647"),
        ("kv:sliding_window=0", "kv: option sliding_window=0 must be at least 1 and at most 2147483647"),
        ("fixed:seq_len=0", "fixed: option seq_len=0 must be at least 1 and at most 2147483647"),
        ("fixed:batch_size=99999999999999999999", "fixed: option batch_size=99999999999999999999 must be at least 1 and at most"),
        ("fixed:sequence_length=0", "fixed: option sequence_length=0 must be at least 1 and at most 2147483647"),
        ("fixed:sequence_length=-3", "fixed: option sequence_length=-3 must be at least 1 and at most 2147483647"),
        ("fixed:sizes=rows=2147483648", "fixed: option rows=2147483648 must be at least 1 and at most 2147483647"),
        ("fold:max_elements=-1", "fold: option max_elements=-1 must be at least 1 and at most 2147483647"),
        ("mxfp6:block=0", "mxfp6: option block=0 must be at least 1 and at most 65536"),
        ("mxfp6:block=99999999999999999999", "mxfp6: option block=99999999999999999999 must be at least 1 and at most 65536"),
        ("mxfp4:block=65537", "mxfp4: option block=65537 must be at least 1 and at most 65536"),
        ("mxint8:min_size=-1", "mxint8: option min_size=-1 must be at least 0 and at most"),
        ("mxint8kv:block=0", "mxint8kv: option block=0 must be at least 1 and at most 65536"),
        ("fp16clip:margin=nan", "fp16clip: option margin=nan must be a finite number"),
        ("fp16clip:margin=inf", "fp16clip: option margin=inf must be a finite number"),
        ("fp16clip:margin=0", "fp16clip: option margin=0.0 must be greater than 0"),
        ("fp16clip:margin=-1.5", "fp16clip: option margin=-1.5 must be greater than 0"),
        ("fp16clip:calibrate=-1", "fp16clip: option calibrate=-1 must be at least 0 and at most 10000"),
        ("fp16clip:calibrate=10001", "fp16clip: option calibrate=10001 must be at least 0 and at most 10000"),
    ],
)
def test_text_options_out_of_range_are_refused(text, message):
    with pytest.raises(PassOptionError) as exc:
        _build(text)
    assert exc.value.message.startswith(message), exc.value.message


def test_a_float_for_an_integer_option_is_refused_as_such():
    with pytest.raises(PassOptionError, match="block='1e23' is invalid: expected an integer"):
        _build("mxfp6:block=1e23")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: KVPass(KVPass.Options(ctx_len=2**31)), "kv: option ctx_len=2147483648 must be at least 1 and at most 2147483647"),
        (lambda: KVPass(ctx_len=0), "kv: option ctx_len=0 must be at least 1 and at most 2147483647"),
        (lambda: KVPass(KVPass.Options(ctx_len=64), prefill_len=0), "kv: option prefill_len=0 must be at least 1 and at most"),
        (lambda: KVPass(KVPass.Options(prefill_len=None)), "kv: option prefill_len needs a value"),
        (lambda: KVPass(KVPass.Options(kv_dtype="bfloat16")), "kv: option kv_dtype='bfloat16' must be one of float32, float16"),
        (lambda: KVPass(KVPass.Options(ctx_len=64.0)), "kv: option ctx_len=64.0 must be an integer"),
        (lambda: MXFP6Pass(MXFP6Pass.Options(block=10**23)), "mxfp6: option block=" + str(10**23) + " must be at least 1 and at most 65536"),
        (lambda: MXFP6Pass(block=1e23), "mxfp6: option block=1e+23 must be an integer"),
        (lambda: FoldPass(max_elements=True), "fold: option max_elements=True must be an integer"),
        (lambda: FP16ClipPass(margin=float("nan")), "fp16clip: option margin=nan must be a finite number"),
        (lambda: FP16ClipPass(margin=-np.inf), "fp16clip: option margin=-inf must be a finite number"),
        (lambda: FixedPass(FixedPass.Options(seq_len=0)), "fixed: option seq_len=0 must be at least 1 and at most 2147483647"),
        (lambda: FixedPass(FixedPass.Options(sizes=("rows=0",))), "fixed: option rows=0 must be at least 1 and at most 2147483647"),
        (lambda: FixedPass(FixedPass.Options(sizes=("rows",))), "fixed: size 'rows' is not name=number"),
        (lambda: MXINT8KVPass(block=-4), "mxint8kv: option block=-4 must be at least 1 and at most 65536"),
    ],
)
def test_python_options_out_of_range_are_refused(make, message):
    with pytest.raises(PassOptionError) as exc:
        make()
    assert exc.value.message.startswith(message), exc.value.message


def test_bounds_are_inclusive():
    assert _build(f"kv:ctx_len=1,prefill_len={INT32_MAX}")[0].options.prefill_len == INT32_MAX
    assert KVPass(ctx_len=INT32_MAX).options.ctx_len == INT32_MAX
    assert _build("mxfp6:block=65536,min_size=0")[0].options.block == 65536
    assert _build("fp16clip:calibrate=0,margin=1e-30")[0].options.margin == 1e-30
    assert FP16ClipPass(calibrate=10_000, margin=2).options.margin == 2
    (fixed,) = _build(f"fixed:seq_len=1,rows={INT32_MAX}")
    assert fixed.options.seq_len == 1 and fixed.options.sizes == (f"rows={INT32_MAX}",)


def test_every_numeric_option_of_every_pass_is_bounded():
    """A new numeric option without bounds would let a typo into the manifest."""
    unbounded = []
    for name, cls in PASS_REGISTRY.items():
        if not cls.__module__.startswith("qeff.passes"):
            continue  # passes registered by tests
        hints = typing.get_type_hints(cls.Options)
        for field in dataclasses.fields(cls.Options):
            kinds = set(typing.get_args(hints[field.name])) | {hints[field.name]}
            if kinds & {int, float} and not {"min", "above"} & set(field.metadata):
                unbounded.append(f"{name}:{field.name}")
    assert unbounded == []


def test_list_passes_shows_the_ranges():
    rows = {r[0]: r for r in describe_options(KVPass)}
    assert rows["ctx_len"][1] == "int 1..2147483647 | none"
    assert rows["kv_dtype"][1] == "float32|float16"  # no bounds, unchanged
    margin = {r[0]: r for r in describe_options(FP16ClipPass)}["margin"]
    assert margin[1] == "float > 0" and margin[2] == "1.0"
    assert {r[0]: r for r in describe_options(MXFP6Pass)}["block"][1] == "int 1..65536"


def test_block_at_the_bound_quantizes_like_one_block_per_column(tmp_path):
    """The largest block the option allows reaches the kernel; with a reduction axis of 64 it
    must equal block=64 (one block per column), and differ from small blocks."""
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal((64, 64)) * np.logspace(-3, 3, 64)[:, None]).astype(np.float32) for n in ("w1", "w2")}
    results = {}
    for block in (16, 64, 65536):
        model = ir.serde.deserialize_model(parse(TWO_MATMULS, weights))
        MXFP6Pass(block=block)(model)
        results[block] = model.graph.initializers["w1"].const_value.numpy()
    np.testing.assert_array_equal(results[65536], results[64])
    assert not np.array_equal(results[16], results[64])


def _invoke(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["qeff-opt", *map(str, args)])
    monkeypatch.setattr(cli._State, "debug", False)
    with pytest.raises(SystemExit) as exc:
        cli.opt_main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("spec", ["kv:ctx_len=99999999999999999999", "mxfp6:block=99999999999999999999",
                                  "fixed:seq_len=99999999999999999999", "fp16clip:margin=nan"])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, spec):
    src = save(mlp_model()[0], tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = _invoke([src, "--passes", spec, "-o", out], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qeff-opt: error: ") and "must be" in lines[0]
    assert "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
