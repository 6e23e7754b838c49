"""Frontend stage: plain ONNX export of Hugging Face causal LMs.

Produces the graph every later pass starts from: ``(input_ids, attention_mask, position_ids)
-> logits`` with symbolic ``batch`` and ``seq`` dimensions, no KV cache. torch and transformers
are an optional extra (``qeff-opt[export]``): this package imports without them, and the
functions that need them raise :class:`~qeff.errors.MissingDependencyError`.
"""

from __future__ import annotations

import logging

from .api import ExportResult, export_model
from .check import compare_with_onnxruntime
from .export import export_causal_lm
from .loading import load_causal_lm
from .prefix_check import PrefixComparison, compare_prefix
from .randomize import randomize_parameters
from .tiny import TINY_ARCHITECTURES, build_tiny_model, tiny_config
from .with_past import export_with_past

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_ARCHITECTURES",
    "tiny_config",
    "build_tiny_model",
    "randomize_parameters",
    "load_causal_lm",
    "export_causal_lm",
    "export_with_past",
    "compare_with_onnxruntime",
    "compare_prefix",
    "PrefixComparison",
    "export_model",
    "ExportResult",
]
