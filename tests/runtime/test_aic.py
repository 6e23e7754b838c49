"""AicSession on a compile folder of a tiny KV Llama, run by the stand-in libQAic.so.

The folder is a real dry-run compile (``qeff.backend_aic.compile_model``) of
``optimize(tiny_export("llama"), "kv:ctx_len=32")`` plus a stand-in ``qpc/programqpc.bin``
(see aic_helpers); the stand-in's program is recomputed in NumPy by ``expected_step``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qeff.errors import QeffError
from qeff.runtime.aic import AicLibraryError, AicRuntimeError, AicSession
from tests.runtime.aic_helpers import aic_folder, counter, expected_step, kv_model, standin_lib

__all__ = ["aic_folder", "kv_model", "standin_lib"]  # fixtures, imported for pytest

CTX = 32
PREFILL = 32
VOCAB = 512


@pytest.fixture(autouse=True)
def _no_injected_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QAIC_STANDIN_FAIL", "QAIC_STANDIN_DEVICES", "QAIC_STANDIN_SLEEP_MS", "QAIC_LIB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def folder_copy(aic_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the compile folder, for tests that change it."""
    return Path(shutil.copytree(aic_folder, tmp_path / "compiled"))


def prefill_feeds(length: int = 20) -> dict[str, np.ndarray]:
    """A right-padded prefill: ``length`` real tokens, the rest position -1."""
    ids = (np.arange(PREFILL, dtype=np.int64) * 7 + 3)[None] % VOCAB
    pos = np.where(np.arange(PREFILL) < length, np.arange(PREFILL), -1).astype(np.int64)[None]
    return {"input_ids": ids, "position_ids": pos}


def decode_feeds(token: int, position: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.array([[token]], np.int64), "position_ids": np.array([[position]], np.int64)}


def zero_state(session: AicSession) -> dict[str, np.ndarray]:
    return {name: np.zeros((1, 2, CTX, 16), session.spec(name).dtype) for name in session.retained}


def logits_shape() -> tuple[int, int, int]:
    return (1, 1, VOCAB)


# ---- opening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "qpc folder", "qpc file"])
def test_aic_opens_every_form_of_the_path(form: str, aic_folder: Path, standin_lib: Path) -> None:
    path = {"folder": aic_folder, "qpc folder": aic_folder / "qpc", "qpc file": aic_folder / "qpc" / "programqpc.bin"}
    with AicSession(path[form], lib=standin_lib) as session:
        assert session.input_names == ["input_ids", "position_ids"]
        assert session.output_names == ["logits"]
        assert session.retained == {f"past_{kv}.{i}": f"past_{kv}.{i}_RetainedState" for i in (0, 1)
                                    for kv in ("key", "value")}
        assert session.specializations == [{"batch_size": 1, "seq_len": 32, "ctx_len": 32},
                                           {"batch_size": 1, "seq_len": 1, "ctx_len": 32}]
        # custom_io.yaml keeps the cache as float16 on the card: that is the dtype to pass and read.
        assert session.spec("past_key.0").dtype == np.float16
        assert session.spec("logits").shape == ("batch_size", 1, VOCAB)
        assert session.io_descriptor == (aic_folder / "qpc" / "programqpc.bin").read_bytes()


def test_aic_reads_the_named_specializations_form(folder_copy: Path, standin_lib: Path) -> None:
    path = folder_copy / "specializations.json"
    flat = json.loads(path.read_text())["specializations"]
    path.write_text(json.dumps({"specializations": [{"name": n, "symbols": s} for n, s in zip(("Prefill", "Decode"), flat)]}))
    with AicSession(folder_copy, lib=standin_lib) as session:
        assert [s["seq_len"] for s in session.specializations] == [32, 1]


# ---- lifecycle ---------------------------------------------------------------------------------


def test_aic_lifecycle_close_twice_and_use_after_close(aic_folder: Path, standin_lib: Path) -> None:
    live = counter(standin_lib, "live")
    with AicSession(aic_folder, lib=standin_lib) as session:
        assert counter(standin_lib, "live") == live + 5
        session.run(prefill_feeds())
    assert counter(standin_lib, "live") == live
    session.close()  # closing twice does nothing
    for use in (lambda: session.run(prefill_feeds()), session.reset, session.state, lambda: session.io_descriptor):
        with pytest.raises(AicRuntimeError, match="the session is closed") as info:
            use()
        assert info.value.hint == "open a new AicSession"
    assert "closed" in repr(session)


# ---- marshalling and retained state ------------------------------------------------------------


def test_aic_outputs_and_state_match_numpy(aic_folder: Path, standin_lib: Path) -> None:
    """Prefill (right-padded) then decode steps: the logits and the mirrored cache equal the
    stand-in's program computed in NumPy, step after step."""
    with AicSession(aic_folder, lib=standin_lib, mirror_state=True) as session:
        expected = zero_state(session)
        steps = [prefill_feeds(20)] + [decode_feeds(token, 20 + i) for i, token in enumerate((5, 77, 300))]
        for feeds in steps:
            out = session.run(feeds)
            assert set(out) == {"logits"} and out["logits"].dtype == np.float32
            expected, logits = expected_step(expected, feeds["input_ids"], feeds["position_ids"], logits_shape())
            np.testing.assert_array_equal(out["logits"], logits)
            state = session.state()
            assert list(state) == list(expected)
            for name in expected:
                assert state[name].dtype == np.float16
                np.testing.assert_array_equal(state[name], expected[name])


def test_aic_state_stays_on_the_card_and_is_carried_across_runs(aic_folder: Path, standin_lib: Path) -> None:
    with AicSession(aic_folder, lib=standin_lib) as session:
        expected = zero_state(session)
        for feeds in (prefill_feeds(10), decode_feeds(42, 10), decode_feeds(43, 11)):
            logits = session.run(feeds)["logits"]
            # No byte of the cache crossed "PCIe": past_* and *_RetainedState went as zero-size buffers.
            assert counter(standin_lib, "retained_bytes_in") == counter(standin_lib, "retained_bytes_out") == 0
            expected, want = expected_step(expected, feeds["input_ids"], feeds["position_ids"], logits_shape())
            np.testing.assert_array_equal(logits, want)
        with pytest.raises(QeffError, match="lives on the card") as info:
            session.state()
        assert "mirror_state=True" in info.value.hint


def test_aic_passing_past_replaces_the_state_and_reset_zeroes_it(aic_folder: Path, standin_lib: Path) -> None:
    rng = np.random.default_rng(1)
    with AicSession(aic_folder, lib=standin_lib, mirror_state=True) as session:
        session.run(prefill_feeds(16))
        given = {n: rng.integers(0, 100, (1, 2, CTX, 16)).astype(np.float16) for n in session.retained}
        feeds = decode_feeds(9, 16)
        logits = session.run({**feeds, **given})["logits"]
        assert counter(standin_lib, "retained_bytes_in") == sum(a.nbytes for a in given.values())
        expected, want = expected_step(given, feeds["input_ids"], feeds["position_ids"], logits_shape())
        np.testing.assert_array_equal(logits, want)
        np.testing.assert_array_equal(session.state()["past_value.1"], expected["past_value.1"])

        session.reset()
        assert all(not a.any() for a in session.state().values())  # zeros until the next run
        feeds = decode_feeds(11, 3)
        logits = session.run(feeds)["logits"]
        assert counter(standin_lib, "retained_bytes_in") == sum(a.nbytes for a in given.values())  # zeros went up
        expected, want = expected_step(zero_state(session), feeds["input_ids"], feeds["position_ids"], logits_shape())
        np.testing.assert_array_equal(logits, want)
        session.run(decode_feeds(12, 4))
        assert counter(standin_lib, "retained_bytes_in") == 0  # the reset is done once


# ---- errors --------------------------------------------------------------------------------------


def test_aic_missing_library(aic_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AicLibraryError, match=r"tried .*nowhere/libQAic\.so \(from the lib argument\)") as info:
        AicSession(aic_folder, lib=tmp_path / "nowhere" / "libQAic.so")
    assert "QAIC_LIB" in info.value.hint
    monkeypatch.setenv("QAIC_LIB", str(tmp_path / "env-libQAic.so"))
    with pytest.raises(AicLibraryError, match=r"env-libQAic\.so \(from \$QAIC_LIB\)"):
        AicSession(aic_folder)


def test_aic_missing_qpc_or_not_a_compile_folder(folder_copy: Path, standin_lib: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder_copy / "qpc")
    with pytest.raises(QeffError, match="there is no QPC at") as info:
        AicSession(folder_copy, lib=standin_lib)
    assert "dry run" in info.value.hint
    with pytest.raises(QeffError, match="is not a compile folder"):
        AicSession(tmp_path / "elsewhere", lib=standin_lib)


def test_aic_damaged_qpc_is_a_runtime_error_naming_the_call(folder_copy: Path, standin_lib: Path) -> None:
    (folder_copy / "qpc" / "programqpc.bin").write_bytes(b"\x00not a qpc")
    with pytest.raises(AicRuntimeError, match=r"qaicOpenQpcFile failed with status 6 \(QS_INVAL\)") as info:
        AicSession(folder_copy, lib=standin_lib)
    assert "compile it again" in info.value.hint


@pytest.mark.parametrize(("feeds", "message"), [
    ({**prefill_feeds(), "attention_mask": np.ones((1, 32), np.int64)}, "has no input 'attention_mask'"),
    ({"input_ids": prefill_feeds()["input_ids"]}, "input 'position_ids' is missing"),
    ({**prefill_feeds(), "input_ids": prefill_feeds()["input_ids"].astype(np.int32)}, "must be int64, got int32"),
    ({**prefill_feeds(), "input_ids": prefill_feeds()["input_ids"][0]}, "must have 2 dims"),
    ({"input_ids": np.zeros((1, 7), np.int64), "position_ids": np.zeros((1, 7), np.int64)},
     r"match none of the shapes the QPC was compiled for"),
    ({"input_ids": np.zeros((1, 32), np.int64), "position_ids": np.zeros((1, 1), np.int64)},
     "'position_ids' has seq_len=1, but 'input_ids' has seq_len=32"),
    ({**decode_feeds(1, 1), "past_key.0": np.zeros((1, 2, CTX, 16), np.float32)}, "must be float16, got float32"),
    ({**decode_feeds(1, 1), "past_key.0": np.zeros((1, 2, 16, 16), np.float16)}, r"\(batch_size=1, ctx_len=16, seq_len=1\) match none"),
])
def test_aic_bad_feeds_are_clear_errors(feeds: dict, message: str, aic_folder: Path, standin_lib: Path) -> None:
    with AicSession(aic_folder, lib=standin_lib) as session:
        runs = counter(standin_lib, "runs")
        with pytest.raises(QeffError, match=message):
            session.run(feeds)
        assert counter(standin_lib, "runs") == runs  # refused before reaching the runtime
        session.run(prefill_feeds())  # and the session still works


def test_aic_wrong_shape_lists_the_compiled_shapes(aic_folder: Path, standin_lib: Path) -> None:
    with AicSession(aic_folder, lib=standin_lib) as session, pytest.raises(QeffError) as info:
        session.run({"input_ids": np.zeros((1, 7), np.int64), "position_ids": np.zeros((1, 7), np.int64)})
    assert "seq_len=32" in info.value.hint and "seq_len=1" in info.value.hint


@pytest.mark.parametrize("call", ["qaicCreateContext", "qaicLoadProgram", "qaicCreateExecObj"])
def test_aic_failing_open_call(call: str, aic_folder: Path, standin_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_STANDIN_FAIL", f"{call}=300")
    live = counter(standin_lib, "live")
    with pytest.raises(AicRuntimeError, match=rf"{call} failed with status 300 \(QS_DEV_ERROR\)") as info:
        AicSession(aic_folder, lib=standin_lib)
    assert info.value.hint
    assert counter(standin_lib, "live") == live


def test_aic_failing_run_call_then_recovery(aic_folder: Path, standin_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with AicSession(aic_folder, lib=standin_lib) as session:
        monkeypatch.setenv("QAIC_STANDIN_FAIL", "qaicExecObjWaitForCompletion=9")
        with pytest.raises(AicRuntimeError, match=r"running: qaicExecObjWaitForCompletion failed with status 9") as info:
            session.run(prefill_feeds())
        assert "specialization" in info.value.hint
        monkeypatch.delenv("QAIC_STANDIN_FAIL")
        assert session.run(prefill_feeds())["logits"].shape == logits_shape()


def test_aic_bad_device(aic_folder: Path, standin_lib: Path) -> None:
    with pytest.raises(AicRuntimeError, match=r"qaicCreateContext failed with status 5 \(QS_NODEV\)") as info:
        AicSession(aic_folder, lib=standin_lib, device_id=2)
    assert "device id" in info.value.hint


@pytest.mark.parametrize("device_id", [-1, -(2**31), 2**31, True, 1.0, "0"])
def test_aic_refuses_an_impossible_device_id_before_the_runtime(device_id: object, aic_folder: Path,
                                                                standin_lib: Path, tmp_path: Path) -> None:
    """Refused before the folder is read or the library loaded: the stand-in opens nothing, and a
    library path that does not exist (or a folder that is not one) is never reached."""
    live = counter(standin_lib, "live")
    with pytest.raises(QeffError, match="device_id must be") as info:
        AicSession(aic_folder, lib=standin_lib, device_id=device_id)
    assert not isinstance(info.value, (AicRuntimeError, AicLibraryError)) and info.value.hint
    assert counter(standin_lib, "live") == live
    with pytest.raises(QeffError, match="device_id must be"):
        AicSession(tmp_path / "no-such-folder", lib=tmp_path / "no-libQAic.so", device_id=device_id)


def test_aic_takes_the_largest_device_id_to_the_runtime(aic_folder: Path, standin_lib: Path) -> None:
    """2**31-1 is a valid id: it reaches the runtime, which reports that no such device exists."""
    with pytest.raises(AicRuntimeError, match="qaicCreateContext failed"):
        AicSession(aic_folder, lib=standin_lib, device_id=2**31 - 1)


# ---- generation through the card's session ------------------------------------------------------


class _StandinInNumpy:
    """The stand-in's program as a plain Python session, for generate() to drive."""

    def __init__(self, like: AicSession) -> None:
        from qeff.runtime.session import Session

        self.inputs, self.outputs, self.specializations = like.inputs, like.outputs, like.specializations
        self.state_now = zero_state(like)
        self.retained = Session.retained.fget(self)
        self.input_names = Session.input_names.fget(self)
        self.spec = lambda name: Session.spec(self, name)

    def reset(self) -> None:
        self.state_now = {k: np.zeros_like(v) for k, v in self.state_now.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.state_now, logits = expected_step(self.state_now, feeds["input_ids"], feeds["position_ids"],
                                               (feeds["input_ids"].shape[0], 1, VOCAB))
        return {"logits": logits}


def test_generate_runs_through_the_aic_session(aic_folder: Path, standin_lib: Path) -> None:
    """qeff.runtime.generate on the card's session (prefill chunk = the compiled 32, decode 1)
    gives the tokens the stand-in's program gives when computed in NumPy."""
    from qeff.runtime import generate

    prompt = [[5, 9, 3, 7, 100, 42]]
    with AicSession(aic_folder, lib=standin_lib) as session:
        got = generate(session, prompt, 6)
        want = generate(_StandinInNumpy(session), prompt, 6)
    assert got.tokens == want.tokens and len(got.tokens[0]) == 6
    assert got.stats.decode_tokens == 5
