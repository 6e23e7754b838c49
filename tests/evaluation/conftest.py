"""The reference model exported once per session, and its rewrites, cached by pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``qeff export --reference`` (TorchScript, the demo's exporter), not checked: the tests
    compare it with torch themselves."""
    pytest.importorskip("torch")
    from qeff.frontend import export_model
    from qeff.reference import CHECKPOINT

    folder = tmp_path_factory.mktemp("reference")
    return export_model(source=CHECKPOINT, output=folder / "reference.onnx", exporter="torchscript",
                        check="none", progress=False).path


@pytest.fixture(scope="session")
def rewritten(reference_onnx: Path) -> Callable[[str], Path]:
    """``rewritten(passes)``: the reference export after ``passes`` (kv at ctx_len 128), once per session."""
    from qeff.optimizer import optimize

    cache: dict[str, Path] = {}

    def factory(passes: str) -> Path:
        if passes not in cache:
            out = reference_onnx.with_name(f"reference.{len(cache)}.onnx")
            overrides = {"ctx_len": "128"} if "kv" in [p.split(":")[0] for p in passes.split(",")] else None
            cache[passes] = optimize(reference_onnx, passes, out, overrides=overrides).output
        return cache[passes]

    return factory
