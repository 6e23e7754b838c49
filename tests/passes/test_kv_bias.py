"""kv reads ALiBi slopes from a bias evaluated on probe positions and refuses any other bias.

The classifier is checked against biases written out independently here, in the shapes the
exporters give them: BLOOM's [b*h, 1, keys] from absolute key positions, a relative
[1, h, queries, keys] table, and biases that are not ALiBi."""

from __future__ import annotations

import numpy as np
import pytest

from qeff.passes.kv.bias import classify_bias

H, L = 4, 9
SLOPES = 2.0 ** -(8.0 * np.arange(1, H + 1) / H)


def test_absolute_key_positions_per_head():
    bias = (SLOPES[:, None, None] * np.arange(L)[None, None, :]).astype(np.float32)  # [h, 1, L]
    rule = classify_bias(bias, H, L)
    assert str(rule) == "ALiBi"
    np.testing.assert_allclose(rule.slopes, SLOPES, rtol=1e-6)


def test_relative_table_ignores_what_the_mask_hides():
    q, k = np.indices((L, L))
    bias = -(q - k)[None, None] * SLOPES[None, :, None, None]  # [1, h, L, L]
    bias = np.where(k > q, 123.0, bias)  # above the diagonal: never seen, anything may be there
    rule = classify_bias(bias.astype(np.float32), H, L)
    np.testing.assert_allclose(rule.slopes, SLOPES, rtol=1e-6)


def test_one_bias_for_every_head():
    rule = classify_bias((0.5 * np.arange(L, dtype=np.float32))[None, None, None], H, L)
    np.testing.assert_allclose(rule.slopes, np.full(H, 0.5), rtol=1e-6)


@pytest.mark.parametrize("bias,detail", [
    (np.log1p(np.arange(L, dtype=np.float32))[None, None, None].repeat(H, 1), "head 0, query 8, key 1"),
    (np.arange(L * H, dtype=np.float32).reshape(1, H, 1, L) ** 2 / 100, "head 0, query 8, key 1"),
    (np.zeros((1, H, 1, L + 1), np.float32), f"not [.., {L} keys]"),
    (np.zeros((2, 3, L), np.float32), f"no dim of {H} heads"),
])
def test_a_bias_that_is_not_alibi_is_described(bias, detail):
    rule = classify_bias(bias, H, L)
    assert rule.slopes is None and detail in str(rule)


def test_slopes_that_differ_between_query_rows_are_not_alibi():
    q, k = np.indices((L, L))
    bias = (k * (1.0 + (q >= 5)))[None, None].repeat(H, 1).astype(np.float32)  # rows from 5 on: twice as steep
    rule = classify_bias(bias, H, L)
    assert rule.slopes is None and "query 1, key 1" in rule.detail
