"""qeff-opt: rewrite plain ONNX exports of Hugging Face LLMs into what the Cloud AI 100
ahead-of-time compiler needs (KV cache, fixed shapes, fp16 safety, MX quantization).

The public API::

    import qeff
    result = qeff.optimize("model.onnx", "cleanup,fold", "model.opt.onnx", verify=True)
    print(result.report.to_dict())
    qeff.list_passes()                      # names, summaries, options
    qeff.evaluate("model.kv.onnx", reference="model.onnx", text="docs.txt")  # perplexity, agreement, KL

Stages live in sub-packages: ``qeff.frontend`` (export), ``qeff.passes`` (rewriting),
``qeff.backend_aic`` (compiler lowering) and ``qeff.runtime`` (execution); ``qeff.contract``
holds the names they share and ``qeff.verify`` checks a rewrite. Attributes load on first
use, so importing one stage does not import the others.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import Any

from qeff.errors import QeffError

# public name -> module that defines it
_LAZY = {
    "optimize": "qeff.optimizer",
    "evaluate": "qeff.evaluation",
    "QeffPass": "qeff.passes",
    "PipelineResult": "qeff.passes",
    "run_passes": "qeff.passes",
    "load_model": "qeff.passes",
    "save_model": "qeff.passes",
    "PASS_REGISTRY": "qeff.passes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qeff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def list_passes() -> dict[str, str]:
    """Registered pass names and their one-line summaries."""
    from qeff.passes import PASS_REGISTRY

    return {name: cls.summary for name, cls in sorted(PASS_REGISTRY.items())}


def export(**kwargs: Any) -> Any:
    """Export a Hugging Face causal LM to plain ONNX (see ``qeff.frontend.export_model``)."""
    from qeff.frontend import export_model

    return export_model(**kwargs)


__all__ = [
    "__version__",
    "QeffError",
    "QeffPass",
    "PipelineResult",
    "optimize",
    "evaluate",
    "run_passes",
    "load_model",
    "save_model",
    "list_passes",
    "export",
]
