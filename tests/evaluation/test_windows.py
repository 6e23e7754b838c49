"""The windows qeff eval cuts a text into: every token after the first ``context`` is scored
exactly once, with at least ``context`` tokens of its window before it."""

from __future__ import annotations

import numpy as np
import pytest

from qeff.errors import QeffError
from qeff.evaluation import cut_windows


@pytest.mark.parametrize("n,window,context", [(128, 128, 32), (129, 128, 32), (1000, 128, 32), (1000, 65, 16),
                                              (97, 10, 1), (50, 50, 49)])
def test_every_token_after_the_context_is_scored_once(n, window, context):
    w = cut_windows(np.arange(n), window, context)
    seen = np.zeros(n, int)
    for start, first in zip(w.starts, w.first):
        assert 0 <= start and start + window <= n
        assert first >= context
        seen[start + first:start + window] += 1
    assert (seen[:context] == 0).all() and (seen[context:] == 1).all()
    assert w.scored == n - context
    np.testing.assert_array_equal(w.rows([len(w.starts) - 1])[0], np.arange(n - window, n) if n > window else
                                  np.arange(window))


def test_a_text_shorter_than_a_window_is_refused():
    with pytest.raises(QeffError, match="the text is 127 tokens long, shorter than one window of 128"):
        cut_windows(np.arange(127), 128, 32)
    with pytest.raises(QeffError, match="context 128 must be"):
        cut_windows(np.arange(500), 128, 128)
