"""Shared fixtures: ``tiny_export``, a session-wide cache of exported tiny Hugging Face models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_export(arch, exporter="dynamo", opset=None, attn="eager", with_past=False) -> Path``.

    Exports ``build_tiny_model(arch, seed=0, attn_implementation=attn)`` once per test session
    per argument combination (``with_past``: the dynamic-cache form of
    :func:`qeff.frontend.export_with_past`) and returns the path of the ``.onnx`` file (weights inline). Tests
    that need the torch model rebuild it with the same arguments: the weights are a pure
    function of ``(arch, seed)``. Treat the files as read-only; they are shared.
    Skips the test when torch or transformers is not installed.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qeff.frontend import build_tiny_model, export_causal_lm, export_with_past

    cache: dict[tuple[str, str, int | None, str], Path] = {}

    def factory(arch: str, exporter: str = "dynamo", opset: int | None = None, attn: str = "eager",
                with_past: bool = False) -> Path:
        key = (arch, exporter, opset, attn, with_past)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{exporter}-{opset or 'default'}-{attn}")
            model = build_tiny_model(arch, seed=0, attn_implementation=attn)
            if with_past:
                cache[key] = export_with_past(model, folder / f"{arch}-with-past.onnx", opset=opset)
            else:
                cache[key] = export_causal_lm(
                    model, folder / f"{arch}.onnx", exporter=exporter, opset=opset, external_data=False, progress=False
                )
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_bert_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT exported the classic way: TorchScript, opset 17, inputs
    ``input_ids``/``attention_mask``/``token_type_ids`` with dims ``batch_size``/``sequence_length``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qeff.frontend.randomize import randomize_parameters

    config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        bert = transformers.BertModel(config).eval()
    randomize_parameters(bert, 0)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes |= {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}}
    path = tmp_path_factory.mktemp("tiny-bert") / "bert.onnx"
    example = (torch.ones(2, 8, dtype=torch.long),) * 2 + (torch.zeros(2, 8, dtype=torch.long),)
    torch.onnx.export(Encoder().eval(), example, str(path), input_names=names,
                      output_names=["last_hidden_state", "pooler_output"], dynamic_axes=axes, opset_version=17,
                      dynamo=False)
    return path
