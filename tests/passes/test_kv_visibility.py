"""kv reads each layer's visibility rule from the export's mask, and refuses one it cannot build.

The sliding-window models themselves are checked against Hugging Face in test_kv.py; here the
classifier is checked against rules written out independently, and a mask no rule describes is
refused by layer, with nothing written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qeff.errors import UnsupportedGraphError
from qeff.optimizer import optimize
from qeff.passes.kv.match import find_attention_sites
from qeff.passes.kv.visibility import classify


def _rule(n, see):
    return np.array([[see(q, k) for k in range(n)] for q in range(n)])


@pytest.mark.parametrize("n", [1, 5, 24])
def test_classify_causal_and_windows(n):
    assert classify(_rule(n, lambda q, k: k <= q)).kind == "causal"
    for w in range(1, n):
        rule = classify(_rule(n, lambda q, k: q - w < k <= q))
        assert (rule.kind, rule.window) == ("window", w)


def test_classify_other_rules():
    chunked = classify(_rule(12, lambda q, k: k <= q and k // 4 == q // 4))  # Llama-4 style
    assert chunked.kind == "other" and chunked.detail == "query 4 sees keys [4]"
    assert classify(_rule(6, lambda q, k: True)).detail == "query 0 sees keys [0, 1, 2, 3, 4, 5]"
    assert classify(_rule(6, lambda q, k: k < q)).kind == "other"  # a query that cannot see itself


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_mask_no_rule_describes_is_refused_by_layer(tiny_export, tmp_path, exporter):
    """Layer 1's mask transposed (each query sees the future, not the past): kv refuses it, names
    the layer and what its query 0 sees, and writes nothing."""
    source = tiny_export("llama", exporter=exporter)
    model = ir.load(source)
    site = next(s for s in find_attention_sites(model) if s.layer == 1)
    flipped = ir.node("Transpose", [site.mask], {"perm": [0, 1, 3, 2]})
    model.graph.insert_before(site.mask_node, flipped)
    index = next(i for i, v in enumerate(site.mask_node.inputs) if v is site.mask)
    site.mask_node.replace_input_with(index, flipped.outputs[0])
    out = tmp_path / "kv.onnx"
    with pytest.raises(UnsupportedGraphError, match=r"kv: layer 1: its mask is not causal or a sliding window: "
                                                     r"query 0 sees keys \[0, 1, 2, 3, 4, 5, 6, 7, …\]"):
        optimize(model, "kv:ctx_len=32", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
