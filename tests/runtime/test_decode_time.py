"""Decode-time generation against plain greedy decoding of the same model: speculative decoding
(prompt lookup and a draft model, proposals partly rejected), compute context lengths crossing
their boundaries, and the Cloud AI vLLM plugin's serving pattern replayed on a
continuous-batching model (requests arriving and finishing mid-stream, idle rows of -1)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qeff.errors import QeffError
from qeff.optimizer import optimize
from qeff.runtime import OrtSession, generate
from qeff.runtime.speculative import DraftModel, PromptLookup

CTX = 64
# Repetitive prompts (prompt lookup finds matches) and one without repeats.
PROMPTS = [[5, 9, 3, 7, 5, 9, 3, 7, 5, 9], [12, 13, 14], [21, 22, 23, 24, 21, 22]]


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode-time")

    def make(arch, exporter, passes, name):
        return optimize(tiny_export(arch, exporter=exporter), passes, folder / f"{arch}-{exporter}-{name}.onnx").output

    return make


@pytest.mark.parametrize("arch,exporter", [("llama", "dynamo"), ("gpt2", "torchscript"), ("qwen2", "torchscript")])
def test_speculative_generation_equals_greedy(models, arch, exporter):
    plain = generate(OrtSession(models(arch, exporter, f"kv:ctx_len={CTX}", "kv")), PROMPTS, 24, prefill_len=4)
    for k in (3, 7):
        target = models(arch, exporter, f"kv:ctx_len={CTX},spec:k={k}", f"spec{k}")
        looked = generate(OrtSession(target), PROMPTS, 24, prefill_len=4, speculative=PromptLookup(k=k))
        assert looked.tokens == plain.tokens
        stats = looked.stats
        assert 0 < stats.accepted_tokens < stats.proposed_tokens  # some proposals accepted, some rejected
        assert stats.decode_tokens == sum(len(t) - 1 for t in plain.tokens)
        alone = generate(OrtSession(target), PROMPTS[:1], 24, prefill_len=4, speculative=PromptLookup(k=k)).stats
        assert alone.target_calls == 23 - alone.accepted_tokens  # each accepted proposal saves a call
        assert alone.accepted_tokens > 0
    # A draft with other weights (the same architecture, seed 0 vs the target's rewritten kv
    # model of another exporter would agree always): gpt2's draft is llama's kv model, same vocabulary.
    draft_model = models("llama", "dynamo", f"kv:ctx_len={CTX}", "kv")
    drafted = generate(OrtSession(target), PROMPTS, 24, prefill_len=4,
                       speculative=DraftModel(OrtSession(draft_model), k=3))
    assert drafted.tokens == plain.tokens
    if arch != "llama":
        assert drafted.stats.accepted_tokens < drafted.stats.proposed_tokens


def test_speculative_refusals(models):
    kv = models("llama", "dynamo", f"kv:ctx_len={CTX}", "kv")
    with pytest.raises(QeffError, match="rewrite the model with qeff-opt --passes kv,spec"):
        generate(OrtSession(kv), PROMPTS, 4, speculative=PromptLookup(k=3))
    target = models("llama", "dynamo", f"kv:ctx_len={CTX},spec:k=3", "spec3")
    with pytest.raises(QeffError, match="temperature must be 0"):
        generate(OrtSession(target), PROMPTS, 4, temperature=0.7, speculative=PromptLookup(k=3))
    with pytest.raises(QeffError, match="k=0 must be a positive whole number"):
        PromptLookup(k=0)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    lookup = PromptLookup(k=3, max_ngram=2)
    assert lookup.lookup([1, 2, 3, 4, 9, 1, 2], 3) == [3, 4, 9]  # bigram [1, 2] seen at 0
    assert lookup.lookup([7, 1, 5, 8, 2, 1], 3) == [5, 8, 2]  # no bigram: unigram [1] at 1
    assert lookup.lookup([1, 2, 1, 2, 1, 2], 2) == [1, 2]  # the latest occurrence
    assert lookup.lookup([4, 5, 6], 3) == []


@pytest.mark.parametrize("arch,exporter", [("llama", "dynamo"), ("mistral", "torchscript")])
def test_ccl_generation_crossing_boundaries_equals_the_full_cache(models, arch, exporter):
    plain = generate(OrtSession(models(arch, exporter, f"kv:ctx_len={CTX}", "kv")), PROMPTS, 40, prefill_len=4)
    ccl = OrtSession(models(arch, exporter, f"kv:ctx_len={CTX},ccl:prefill=8|{CTX},decode=8|16|32|{CTX}", "ccl"))
    seen = []
    original = ccl.run

    def spy(feeds):
        lengths = (8, CTX) if feeds["input_ids"].shape[1] > 1 else (8, 16, 32, CTX)  # prefill, decode lists
        seen.append((int(feeds["position_ids"].max()), feeds["comp_ctx_lengths"].size, lengths))
        return original(feeds)

    ccl.run = spy
    assert generate(ccl, PROMPTS, 40, prefill_len=4).tokens == plain.tokens
    assert {length for _, length, _ in seen} == {8, 16, 32, CTX}
    assert all(length == min(c for c in lengths if c > top) for top, length, lengths in seen)


def _idle(fbs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.full((fbs, 1), -1, np.int64) for _ in range(3))


class _Replay:
    """The plugin's pattern: prefill one request at a time into its slot (batch_index [[slot]],
    tokens and positions padded with -1), decode all rows at once with -1 in every idle row."""

    def __init__(self, session: OrtSession, fbs: int, chunk: int = 4):
        self.session, self.fbs, self.chunk = session, fbs, chunk
        self.slots: dict[int, dict] = {}

    def prefill(self, slot: int, prompt: list[int]) -> int:
        for start in range(0, len(prompt), self.chunk):
            part = prompt[start:start + self.chunk]
            ids = np.full((1, self.chunk), -1, np.int64)
            pos = np.full((1, self.chunk), -1, np.int64)
            ids[0, :len(part)], pos[0, :len(part)] = part, np.arange(start, start + len(part))
            logits = self.session.run({"input_ids": ids, "position_ids": pos, "batch_index": np.array([[slot]])})["logits"]
        token = int(np.argmax(logits[0, -1]))
        self.slots[slot] = {"tokens": [token], "position": len(prompt)}
        return token

    def decode(self) -> None:
        ids, pos, rows = _idle(self.fbs)
        for slot, state in self.slots.items():
            ids[slot, 0], pos[slot, 0], rows[slot, 0] = state["tokens"][-1], state["position"], slot
        logits = self.session.run({"input_ids": ids, "position_ids": pos, "batch_index": rows})["logits"]
        for slot, state in self.slots.items():
            state["tokens"].append(int(np.argmax(logits[slot, 0])))
            state["position"] += 1


def test_vllm_replay(models):
    fbs = 5
    model = models("llama", "dynamo", f"kv:ctx_len={CTX},continuous_batching=true,full_batch_size={fbs}", "cb")
    solo = {i: generate(OrtSession(models("llama", "dynamo", f"kv:ctx_len={CTX}", "kv")), [p], 12,
                        prefill_len=4).tokens[0] for i, p in enumerate(PROMPTS)}
    session = OrtSession(model)
    session.reset()
    replay = _Replay(session, fbs)
    # The same prompt in all five slots, admitted one step apart.
    for slot in range(fbs):
        replay.prefill(slot, PROMPTS[0])
        if slot:
            replay.decode()
    while min(len(s["tokens"]) for s in replay.slots.values()) < 12:
        replay.decode()
    firsts = [s["tokens"][:12] for s in replay.slots.values()]
    assert all(t == solo[0] for t in firsts)

    # Requests arriving and finishing mid-stream; idle rows of -1 between them.
    session.reset()
    replay = _Replay(session, fbs)
    arrivals = {0: (1, PROMPTS[1]), 2: (3, PROMPTS[2]), 5: (0, PROMPTS[0])}
    done: dict[int, list[int]] = {}
    which = {}
    for step in range(30):
        if step in arrivals:
            slot, prompt = arrivals[step]
            which[slot] = PROMPTS.index(prompt)
            replay.prefill(slot, prompt)
        before = session.state()
        replay.decode()
        after = session.state()
        idle = [s for s in range(fbs) if s not in replay.slots]
        for name in before:  # idle rows (-1) leave their slots bit-identical, the last one included
            np.testing.assert_array_equal(after[name][idle], before[name][idle])
        for slot, state in list(replay.slots.items()):
            if len(state["tokens"]) >= 12:
                done[which[slot]] = state["tokens"][:12]
                del replay.slots[slot]
    assert done == solo


def test_idle_rows_write_only_where_a_used_row_writes(models):
    """The cache writes of an idle row (batch_index -1) are the used row's, never a -1 index
    (which would address the last slot)."""
    import onnxruntime as ort

    fbs = 5
    path = models("llama", "dynamo", f"kv:ctx_len={CTX},continuous_batching=true,full_batch_size={fbs}", "cb")
    proto = onnx.load(str(path))
    scatter = next(n for n in proto.graph.node if n.op_type == "ScatterND")
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(scatter.input[1]))
    session = ort.InferenceSession(proto.SerializeToString())
    feeds = {i.name: np.zeros([fbs if d == "full_batch_size" else CTX if d == "ctx_len" else d for d in i.shape],
                              np.float32) for i in session.get_inputs() if i.name.startswith("past_")}
    rows = np.array([[-1], [2], [-1], [0], [-1]])
    ids = np.where(rows >= 0, 7, -1)
    pos = np.where(rows >= 0, 3, -1)
    indices = session.run([scatter.input[1]], {**feeds, "input_ids": ids, "position_ids": pos, "batch_index": rows})[0]
    assert set(indices[..., 0].ravel().tolist()) == {0, 2}  # never fbs - 1
    donor = indices[1]  # the used entry with the highest row
    for idle in (0, 2, 4):
        np.testing.assert_array_equal(indices[idle], donor)
