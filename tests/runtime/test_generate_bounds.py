"""What generate, the sampler, the input parsers, the bench and OrtSession refuse, and that they
refuse it before the model runs once; and that generation right at the bounds still works.

Most cases drive a stand-in Session whose "model" is a formula (next token = (3·token +
position + 1) mod V at each row's last valid position), so the tokens generate returns are
checked against that formula computed here, and every call's positions against ctx_len."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qeff.errors import QeffError
from qeff.runtime import OrtSession, Sampler, generate
from qeff.runtime.run import parse_input_ids, read_prompts
from qeff.runtime.session import Session, TensorSpec

CTX = 8
VOCAB = 16


class FormulaSession(Session):
    """A KV-shaped Session without a network. ``ctx`` is told through ``ctx_from``: the
    ``ctx_len`` attribute, a static cache dim, or the specializations."""

    def __init__(self, *, ctx_from: str = "attribute", continuous: bool = False, vocab: int | str = VOCAB,
                 slots: int = 2, seq: int | str = "seq_len") -> None:
        i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
        rows = "full_batch_size" if continuous else "batch_size"
        ctx_dim = CTX if ctx_from == "static" else "ctx_len"
        cache = (rows, 1, ctx_dim, 2)
        self.inputs = [TensorSpec("input_ids", i64, ("batch_size", seq)),
                       TensorSpec("position_ids", i64, ("batch_size", seq)),
                       TensorSpec("past_key.0", f32, cache)]
        if continuous:
            self.inputs.append(TensorSpec("batch_index", i64, ("batch_size", 1)))
        self.outputs = [TensorSpec("logits", f32, ("batch_size", 1, vocab)),
                        TensorSpec("past_key.0_RetainedState", f32, cache)]
        self.specializations = []
        if ctx_from == "specializations":
            extra = {"full_batch_size": slots} if continuous else {}
            self.specializations = [{"batch_size": 1, "seq_len": 4, "ctx_len": CTX, **extra},
                                    {"batch_size": slots if continuous else 1, "seq_len": 1, "ctx_len": CTX, **extra}]
        if ctx_from == "attribute":
            self.ctx_len = CTX
        if continuous and ctx_from != "specializations":
            self.full_batch_size = slots
        self.size = vocab if isinstance(vocab, int) else VOCAB
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        ids, pos = feeds["input_ids"], feeds["position_ids"]
        assert ids.dtype == np.int64 and pos.dtype == np.int64
        assert pos.max() < CTX, f"position {pos.max()} beyond the cache"
        logits = np.zeros((ids.shape[0], 1, self.size), np.float32)
        for r in range(ids.shape[0]):
            if (pos[r] >= 0).any():
                last = int(np.argmax(pos[r]))
                logits[r, 0, (3 * int(ids[r, last]) + int(pos[r, last]) + 1) % self.size] = 1.0
        return {"logits": logits}

    def reset(self):
        pass

    def state(self):
        return {}


def _reference(prompt: list[int], new: int, size: int = VOCAB) -> list[int]:
    seq = list(prompt)
    for _ in range(new):
        seq.append((3 * seq[-1] + len(seq) - 1 + 1) % size)
    return seq[len(prompt):]


SOURCES = [("attribute", False), ("static", False), ("specializations", False),
           ("attribute", True), ("specializations", True)]


def _refused(session: FormulaSession, match: str, *args, **kwargs) -> str:
    with pytest.raises(QeffError, match=match) as info:
        generate(session, *args, **kwargs)
    assert session.calls == 0, "refused only after the model ran"
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("ctx_from,continuous", SOURCES)
def test_prefill_length_bounds(ctx_from, continuous):
    s = FormulaSession(ctx_from=ctx_from, continuous=continuous)
    prompt = [[1, 2, 3]]
    assert _refused(s, "prefill length 9 is above ctx_len 8", prompt, 2, prefill_len=9).startswith("prefill length 9")
    _refused(s, "prefill length 0 must be at least 1", prompt, 2, prefill_len=0)
    _refused(s, "prefill length -4", prompt, 2, prefill_len=-4)
    _refused(s, "prefill_len=2.5 is not a whole number", prompt, 2, prefill_len=2.5)
    # At the bound: a prompt that fills the cache, prefilled in one chunk of ctx_len.
    full = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert generate(s, full, 1, prefill_len=CTX).tokens == [_reference(full[0], 1)]


@pytest.mark.parametrize("ctx_from,continuous", SOURCES)
def test_prompt_and_generation_must_fit_the_cache(ctx_from, continuous):
    s = FormulaSession(ctx_from=ctx_from, continuous=continuous)
    _refused(s, "a prompt of 9 tokens does not fit the cache \\(ctx_len 8\\)", [[1], list(range(9))], 1, prefill_len=4)
    _refused(s, "5 prompt tokens \\+ 5 new tokens do not fit ctx_len 8", [[1, 2, 3, 4, 5]], 5, prefill_len=4)
    _refused(s, "max_new_tokens=0 must be at least 1", [[1]], 0)
    _refused(s, "max_new_tokens=-2 must be at least 1", [[1]], -2)
    _refused(s, "max_new_tokens=2.0 is not a whole number", [[1]], 2.0)
    # Exactly filling the cache is allowed: 5 + 4 - 1 = 8 positions.
    prompts = [[1, 2, 3, 4, 5], [7], [2, 2]]
    result = generate(s, prompts, 4, prefill_len=4)
    assert result.tokens == [_reference(p, 4) for p in prompts]


def test_default_prefill_length_stays_within_a_small_cache():
    s = FormulaSession()
    prompt = [[1, 2, 3, 4, 5, 6]]
    assert generate(s, prompt, 3).tokens == [_reference(prompt[0], 3)]
    assert s.calls == 3  # one prefill chunk of min(32, ctx_len) tokens, two decode steps


@pytest.mark.parametrize("bad,why", [
    (-1, "token ids are >= 0"),
    (VOCAB, "vocabulary has 16 ids \\(0..15\\)"),
    (2**63, "vocabulary has 16 ids"),
    (-(2**70), "token ids are >= 0"),
])
def test_token_ids_are_checked_against_the_vocabulary(bad, why):
    s = FormulaSession()
    _refused(s, f"prompt 1 has token id {bad} at position 2: .*{why}", [[1, 2], [3, 4, bad, 5]], 1)


@pytest.mark.parametrize("bad,why", [
    (-3, "token ids are >= 0"),
    (2**63, "does not fit in int64"),
    (2**80, "does not fit in int64"),
    (np.uint64(2**63 + 5), "does not fit in int64"),
])
def test_token_ids_without_a_known_vocabulary(bad, why):
    s = FormulaSession(vocab="vocab")  # a symbolic logits dim: only the int64 range is known
    _refused(s, f"prompt 0 has token id {int(bad)} at position 0: .*{why}", [[bad, 1]], 1)
    assert generate(s, [[2**40, 1]], 1).tokens == [_reference([2**40, 1], 1)]


@pytest.mark.parametrize("bad", [1.5, "7", None, True])
def test_token_ids_must_be_integers(bad):
    _refused(FormulaSession(), "prompt 0 has .* at position 1, which is not a token id", [[1, bad]], 1)


def test_numpy_integer_ids_are_accepted():
    prompt = np.array([1, 2, 15], dtype=np.int32)
    assert generate(FormulaSession(), [prompt], 2).tokens == [_reference([1, 2, 15], 2)]


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": math.nan}, "temperature=nan must be a finite number >= 0"),
    ({"temperature": math.inf}, "temperature=inf must be a finite number >= 0"),
    ({"temperature": -math.inf}, "temperature=-inf"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"temperature": "hot"}, "temperature='hot' is not a number"),
    ({"top_p": math.nan}, "top_p=nan must be above 0 and at most 1"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_k": -1}, "top_k=-1 must be >= 0"),
    ({"top_k": 2.5}, "top_k=2.5 is not a whole number"),
    ({"seed": -1}, "seed=-1 is negative"),
    ({"seed": 1.5}, "seed=1.5 is not a whole number"),
])
def test_sampler_refuses_bad_settings(kwargs, match):
    with pytest.raises(QeffError, match=match):
        Sampler(**{"temperature": 1.0, **kwargs})
    _refused(FormulaSession(), match, [[1, 2]], 1, **{"temperature": 1.0, **kwargs})


def test_sampler_accepts_the_edges():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    assert Sampler(temperature=0.0, seed=0)(logits) == 0
    assert Sampler(temperature=1.0, top_p=1.0, top_k=0, seed=0)(logits) in (0, 1, 2)
    assert Sampler(temperature=1.0, top_k=1, seed=np.int64(3))(logits) == 0  # top-1 is the argmax


# --- qeff run's parsers ----------------------------------------------------------------------


@pytest.mark.parametrize("text,match", [
    ("5,1e23", "'1e23' is not a whole number"),
    ("5,99999999999999999999999", "id 99999999999999999999999, beyond the largest int64"),
    ("5,9223372036854775808", "beyond the largest int64"),
    ("5," + "9" * 5000, "beyond the largest int64"),
    ("5,-9,3", "negative id -9"),
    ("5,x", "not a list of integers"),
    ("5,+3", "'\\+3' is not a whole number"),
    ("5,2.0", "'2.0' is not a whole number"),
    (" , ", "--input-ids is empty"),
])
def test_parse_input_ids_refuses(text, match):
    with pytest.raises(QeffError, match=match) as info:
        parse_input_ids(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_parse_input_ids_accepts():
    assert parse_input_ids("5,9 3") == [5, 9, 3]
    assert parse_input_ids("0, 9223372036854775807") == [0, 2**63 - 1]
    assert parse_input_ids("007") == [7]


def test_read_prompts_needs_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\nzweite Zeile\n".encode("latin-1"))
    with pytest.raises(QeffError, match="is not UTF-8 text \\(byte 0xe9 at offset 3\\)"):
        read_prompts(None, bad)
    good = tmp_path / "utf8.txt"
    good.write_bytes("café\n\n  \nnaïve\n".encode("utf-8"))
    assert read_prompts(None, good) == ["café", "naïve"]


# --- qeff bench ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"duration": math.nan}, "duration nan must be a finite number of seconds above 0"),
    ({"duration": math.inf}, "duration inf"),
    ({"duration": 0.0}, "duration 0.0"),
    ({"duration": -1}, "duration -1"),
    ({"seq_len": 0}, "seq_len 0 must be a whole number >= 1"),
    ({"seq_len": -5}, "seq_len -5"),
    ({"batch_sizes": [1, 0]}, "batch size 0 must be a whole number >= 1"),
    ({"batch_sizes": [-2]}, "batch size -2"),
    ({"batch_sizes": []}, "no batch size given"),
    ({"instances": [0]}, "instance count 0 must be a whole number >= 1"),
    ({"instances": [1, -1]}, "instance count -1"),
    ({"instances": []}, "no instance count given"),
])
def test_bench_refuses_before_any_work(tmp_path, monkeypatch, kwargs, match):
    from qeff.runtime import throughput

    def no_sessions(*args, **kwargs):
        raise AssertionError("bench_model started sessions before refusing")

    monkeypatch.setattr(throughput, "_sessions", no_sessions)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    args = {"batch_sizes": [1], "instances": [1], "seq_len": 8, "duration": 0.1, **kwargs}
    with pytest.raises(QeffError, match=match):
        throughput.bench_model(model, args.pop("batch_sizes"), args.pop("instances"), **args)


# --- OrtSession sizes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ctx_len", "full_batch_size"])
@pytest.mark.parametrize("value,match", [
    (0, "=0 is out of range"), (-1, "=-1 is out of range"), (2**31, "=2147483648 is out of range"),
    (2**63, "=9223372036854775808 is out of range"), (8.0, "=8.0 is not a whole number"), (True, "=True is not a whole number"),
])
def test_ort_session_refuses_bad_sizes(tmp_path, name, value, match):
    # The file does not exist: the size is refused before the model is opened.
    with pytest.raises(QeffError, match=f"{name}{match}"):
        OrtSession(tmp_path / "missing.onnx", **{name: value})


def _embedding_model(rows: int) -> onnx.ModelProto:
    """A KV-shaped model whose vocabulary only the embedding table tells: input_ids ->
    Gather(table [rows, 4]) -> MatMul -> a Reshape to a shape computed at run time, so shape
    inference cannot fix the logits' last dim; the cache passes through unchanged."""
    rng = np.random.default_rng(0)
    table = helper.make_tensor("table", TensorProto.FLOAT, [rows, 4], rng.standard_normal(rows * 4).tolist())
    head = helper.make_tensor("head", TensorProto.FLOAT, [4, rows], rng.standard_normal(4 * rows).tolist())
    minus_one = helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["scores"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Concat", ["ids_shape", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["scores", "target"], ["logits"]),
        helper.make_node("Identity", ["past_key.0"], ["past_key.0_RetainedState"]),
    ]
    cache = ["batch_size", 1, "ctx_len", 2]
    graph = helper.make_graph(
        nodes, "emb",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq_len"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "seq_len"]),
         helper.make_tensor_value_info("past_key.0", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "seq_len", "vocab"]),
         helper.make_tensor_value_info("past_key.0_RetainedState", TensorProto.FLOAT, cache)],
        [table, head, minus_one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_ort_session_vocab_from_the_embedding_table(tmp_path):
    proto = _embedding_model(37)
    path = tmp_path / "emb.onnx"
    onnx.save(proto, path)
    for source in (path, proto.SerializeToString()):
        session = OrtSession(source, ctx_len=CTX)
        assert session.spec("logits").shape[-1] == "vocab" and session.vocab_size == 37
        with pytest.raises(QeffError, match="prompt 0 has token id 37 at position 1: .*has 37 ids"):
            generate(session, [[3, 37]], 1)
        assert len(generate(session, [[3, 36]], 2).tokens[0]) == 2


# --- a real kv model with ctx_len 8 ---------------------------------------------------------


@pytest.fixture(scope="module")
def kv8(tiny_export, tmp_path_factory):
    from qeff.optimizer import optimize

    out = tmp_path_factory.mktemp("kv8") / "kv8.onnx"
    optimize(tiny_export("llama"), f"kv:ctx_len={CTX}", output=out)
    return out


def _hf_next(prompt: list[int]) -> int:
    torch = pytest.importorskip("torch")
    from qeff.frontend import build_tiny_model

    model = build_tiny_model("llama", seed=0).eval()
    with torch.no_grad():
        return int(model(torch.tensor([prompt])).logits[0, -1].argmax())


def test_kv_model_prefill_bounds_and_vocabulary(kv8):
    session = OrtSession(kv8)  # ctx_len from the manifest beside the model
    assert session.ctx_len == CTX and session.vocab_size == 512
    prompt = [17, 301, 5, 88, 412, 9, 250, 33]
    with pytest.raises(QeffError, match="prefill length 9 is above ctx_len 8"):
        generate(session, [prompt], 1, prefill_len=9)
    with pytest.raises(QeffError, match="prompt 0 has token id 512 at position 1: the model's vocabulary has 512"):
        generate(session, [[1, 512]], 1)
    with pytest.raises(QeffError, match="8 prompt tokens \\+ 2 new tokens do not fit ctx_len 8"):
        generate(session, [prompt], 2, prefill_len=8)
    want = _hf_next(prompt)
    assert generate(session, [prompt], 1, prefill_len=8).tokens == [[want]]
    assert generate(session, [prompt], 1, prefill_len=3).tokens == [[want]]
