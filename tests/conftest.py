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
