"""Export with a dynamic cache: the "with past" form other tools produce, for the ``kv`` pass to convert.

Interface (the names optimum-style exports use):

- inputs ``input_ids``, ``position_ids`` ``[batch, seq]``, ``attention_mask`` ``[batch,
  past + seq]``, then each layer's cache (``qeff.contract.dynamic_cache_input_name``)
  ``[batch, n_kv, past, head_dim]``;
- outputs ``logits`` then ``present.{i}.key`` / ``.value`` ``[batch, n_kv, past + seq, head_dim]``.

Every layer of such a graph concatenates its past with the new K/V (``Concat(past, new)``) and
grows the cache by ``seq`` each call: the shape changes every step, which an ahead-of-time
compiler cannot take. ``qeff-opt --passes kv`` turns it into the fixed-size form.
Only the dynamo exporter is supported: the legacy tracer cannot trace ``DynamicCache``.
"""

from __future__ import annotations

__all__ = ["export_with_past"]

import os
from pathlib import Path
from typing import Any

from qeff.common.atomic import Staging
from qeff.contract import ATTENTION_MASK, HF_CACHE, INPUT_IDS, LOGITS, POSITION_IDS, dynamic_cache_input_name
from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .export import _quiet_exporter, exportable, takes_position_ids

_PAST_LEN = 4
_SEQ = 3
_BATCH = 2


def _wrapper(model: Any, n_layers: int):
    torch, _ = require_torch()
    from transformers import DynamicCache

    class CausalLMWithPast(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001, ANN201
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{HF_CACHE: cache})
            flat = []
            for layer in getattr(out, HF_CACHE).layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return CausalLMWithPast(model)


def export_with_past(model: Any, output: str | os.PathLike[str], *, opset: int | None = None) -> Path:
    """Export ``model`` with past inputs and present outputs (dynamo, weights inline)."""
    torch, _ = require_torch()
    if not takes_position_ids(model):
        raise ExportError("a with-past export needs a model that takes position_ids",
                          "export it plainly and run the kv pass")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (_BATCH, _SEQ))
    with torch.no_grad():  # the cache shapes come from the model itself, not from its config
        probe = getattr(model(input_ids=ids[:, :1], use_cache=True), HF_CACHE)
    shapes = [(layer.keys.shape, layer.values.shape) for layer in probe.layers]
    n_layers = len(shapes)
    past = []
    for k_shape, v_shape in shapes:
        past += [torch.randn(_BATCH, k_shape[1], _PAST_LEN, k_shape[3]),
                 torch.randn(_BATCH, v_shape[1], _PAST_LEN, v_shape[3])]
    mask = torch.ones(_BATCH, _PAST_LEN + _SEQ, dtype=torch.int64)
    pos = torch.arange(_PAST_LEN, _PAST_LEN + _SEQ).expand(_BATCH, _SEQ)
    caches = [(i, k) for i in range(n_layers) for k in ("key", "value")]
    dim = torch.export.Dim
    batch, seq, past_len, total = dim("batch"), dim("seq"), dim("past"), dim("total")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len} for _ in past]}
    staging = Staging(output)
    try:
        target = staging.path
        with _quiet_exporter(), exportable(model), torch.no_grad():
            torch.onnx.export(
                _wrapper(model, n_layers).eval(), (ids, mask, pos, past), str(target), dynamo=True,
                input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *[dynamic_cache_input_name(i, k) for i, k in caches]],
                output_names=[LOGITS, *[f"present.{i}.{k}" for i, k in caches]],
                dynamic_shapes=dynamic, opset_version=opset, external_data=False,
            )
        staging.commit()
    except Exception as exc:
        raise ExportError(f"with-past export failed: {exception_reason(exc)}") from exc
    finally:
        staging.discard()
    return output
