"""Speculative decoding against a target rewritten with ``spec`` (greedy acceptance).

A step sends each row's last token and up to K proposed ones (``seq_len = K + 1``,
``num_logits_to_keep = K + 1``); the target's greedy token after each position is compared
with the next proposal, the longest agreeing run is accepted and the target's own token after
it is added, so every step emits between 1 and K + 1 tokens and the result is exactly what
plain greedy decoding gives. Proposals the target rejected wrote their K/V into cache slots
past the accepted ones; the next step writes those slots again before any query can see them
(a query at position p sees slots <= p), so nothing is rolled back.

Proposers:

- :class:`PromptLookup` — n-gram lookup in the row's own text (prompt and generated tokens):
  the tokens that followed the most recent earlier occurrence of its last n tokens, n from
  ``max_ngram`` down to ``min_ngram``. A row without a match proposes nothing that step.
- :class:`DraftModel` — a second, smaller KV model decoding greedily from its own cache; before
  proposing it is fed the tokens it has not seen (the target's corrections), from the first
  position its cache no longer agrees with.

Slots a row leaves empty (fewer than K proposals, finished rows) are pads: ``input_ids`` and
``position_ids`` of -1, which write nothing the model reads.
"""

from __future__ import annotations

__all__ = ["PromptLookup", "DraftModel", "Proposer"]

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qeff.contract import INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, POSITION_IDS
from qeff.errors import QeffError
from qeff.runtime.session import Session


class Proposer(Protocol):
    k: int

    def start(self, rows: int) -> None: ...

    def propose(self, texts: dict[int, list[int]], limits: dict[int, int]) -> dict[int, list[int]]:
        """Up to ``limits[r]`` proposed tokens for each row ``r`` of ``texts`` (its tokens so far)."""

    def accepted(self, row: int, text_length: int, proposed: int, accepted: int) -> None:
        """The target accepted ``accepted`` of the ``proposed`` tokens; the row's text is now
        ``text_length`` tokens long."""


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QeffError(f"speculative k={k!r} must be a positive whole number", "e.g. k=3")
    return k


@dataclasses.dataclass
class PromptLookup:
    """Propose what followed the last n-gram the last time it occurred (see the module)."""

    k: int = 3
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        _check_k(self.k)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise QeffError(f"n-gram sizes {self.min_ngram}..{self.max_ngram} are not a range of positive sizes",
                            "e.g. min_ngram=1, max_ngram=3")

    def start(self, rows: int) -> None:
        pass

    def lookup(self, text: Sequence[int], limit: int) -> list[int]:
        tokens = np.asarray(text, np.int64)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            # Latest start i < len - n with tokens[i:i+n] == tail and something after it.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            hits = hits[hits + n < len(tokens)]
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start:start + limit].tolist()
        return []

    def propose(self, texts: dict[int, list[int]], limits: dict[int, int]) -> dict[int, list[int]]:
        return {r: self.lookup(text, limits[r]) for r, text in texts.items()}

    def accepted(self, row: int, text_length: int, proposed: int, accepted: int) -> None:
        pass


class DraftModel:
    """Proposals from a second KV model (greedy), kept in step with the target's text."""

    def __init__(self, session: Session, k: int = 3, prefill_len: int | None = None) -> None:
        from qeff.runtime.generate import context_length, prefill_length

        self.session, self.k = session, _check_k(k)
        self.ctx = context_length(session)
        self.chunk = prefill_length(session, prefill_len, self.ctx)
        self.seen: list[int] = []  # per row: how many of its text's tokens the draft's cache holds

    def start(self, rows: int) -> None:
        self.session.reset()
        self.seen = [0] * rows

    def _call(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        feeds = {INPUT_IDS: ids, POSITION_IDS: pos}
        if NUM_LOGITS_TO_KEEP in self.session.input_names:
            feeds[NUM_LOGITS_TO_KEEP] = np.zeros((1, 1), np.int64)
        return self.session.run(feeds)[LOGITS][:, -1]

    def propose(self, texts: dict[int, list[int]], limits: dict[int, int]) -> dict[int, list[int]]:
        rows = len(self.seen)
        out = {r: [] for r in texts}
        # Feed each row what its cache lacks, in chunks; the last chunk gives the first proposal.
        unseen = {r: text[self.seen[r]:] for r, text in texts.items()}
        longest = max(len(u) for u in unseen.values())
        nxt: dict[int, int] = {}
        for c in range(math.ceil(longest / self.chunk)):
            ids = np.full((rows, self.chunk), -1, np.int64)
            pos = np.full((rows, self.chunk), -1, np.int64)
            for r, u in unseen.items():
                part = u[c * self.chunk:(c + 1) * self.chunk]
                ids[r, :len(part)] = part
                pos[r, :len(part)] = np.arange(len(part)) + self.seen[r] + c * self.chunk
            logits = self._call(ids, pos)
            for r, u in unseen.items():
                if c * self.chunk < len(u) <= (c + 1) * self.chunk:
                    nxt[r] = int(np.argmax(logits[r]))
        for r, text in texts.items():
            self.seen[r] = len(text)
        position = {r: len(texts[r]) for r in texts}
        live = {r for r in texts if limits[r] > 0}
        for r in live:
            out[r].append(nxt[r])
        while True:
            live = {r for r in live if len(out[r]) < limits[r] and position[r] < (self.ctx or math.inf) - 1}
            if not live:
                break
            ids = np.full((rows, 1), -1, np.int64)
            pos = np.full((rows, 1), -1, np.int64)
            for r in live:
                ids[r, 0], pos[r, 0] = out[r][-1], position[r]
            logits = self._call(ids, pos)
            for r in live:
                position[r] += 1
                self.seen[r] += 1
                out[r].append(int(np.argmax(logits[r])))
        return out

    def accepted(self, row: int, text_length: int, proposed: int, accepted: int) -> None:
        # The draft holds the text before this step plus the proposals it fed itself (all but
        # its last); those after the first rejected one are wrong.
        before = text_length - accepted - 1
        self.seen[row] = min(self.seen[row], before + accepted)
