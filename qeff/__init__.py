"""qeff-opt: rewrite plain ONNX exports of Hugging Face LLMs into what the Cloud AI 100
ahead-of-time compiler needs (KV cache, fixed shapes, fp16 safety, MX quantization).

The public API::

    import qeff
    result = qeff.optimize("model.onnx", "cleanup,fold", "model.opt.onnx", verify=True)
    print(result.report.to_dict())
    qeff.list_passes()                      # names, summaries, options

Stages live in sub-packages: ``qeff.frontend`` (export), ``qeff.passes`` (rewriting),
``qeff.backend_aic`` (compiler lowering) and ``qeff.runtime`` (execution).
"""

from __future__ import annotations

__version__ = "0.1.0"

from qeff.errors import QeffError  # noqa: E402
from qeff.passes import (  # noqa: E402
    PASS_REGISTRY,
    PipelineResult,
    QeffPass,
    load_model,
    optimize,
    run_passes,
    save_model,
)


def list_passes() -> dict[str, str]:
    """Registered pass names and their one-line summaries."""
    return {name: cls.summary for name, cls in sorted(PASS_REGISTRY.items())}


def export(**kwargs):
    """Export a Hugging Face causal LM to plain ONNX (see ``qeff.frontend.export_model``)."""
    from qeff.frontend import export_model

    return export_model(**kwargs)


__all__ = [
    "__version__",
    "QeffError",
    "QeffPass",
    "PipelineResult",
    "optimize",
    "run_passes",
    "load_model",
    "save_model",
    "list_passes",
    "export",
]
