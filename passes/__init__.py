"""qeff.passes: the IR helpers, the pass base and registry, the manager, and one file per pass.

Importing this package registers every built-in pass in ``PASS_REGISTRY``.
"""

from __future__ import annotations

from qeff.passes.base import PASS_REGISTRY, NoOptions, QeffPass, describe_options, get_pass
from qeff.passes.cleanup import CleanupPass
from qeff.passes.fixed import FixedPass
from qeff.passes.fp16clip import FP16ClipPass
from qeff.passes.fold import FoldPass
from qeff.passes.kv import KVPass
from qeff.passes.mx_weights import MXFP4Pass, MXFP6Pass, MXFP8Pass, MXINT8Pass
from qeff.passes.mxint8kv import MXINT8KVPass
from qeff.passes.manager import PipelineResult, default_output_path, optimize, run_passes
from qeff.passes.model_io import as_ir_model, load_model, save_model
from qeff.passes.pipeline import parse_pipeline, validate_sequence

__all__ = [
    "PASS_REGISTRY",
    "QeffPass",
    "NoOptions",
    "get_pass",
    "describe_options",
    "CleanupPass",
    "FixedPass",
    "FP16ClipPass",
    "FoldPass",
    "KVPass",
    "MXFP4Pass",
    "MXFP6Pass",
    "MXFP8Pass",
    "MXINT8Pass",
    "MXINT8KVPass",
    "PipelineResult",
    "optimize",
    "run_passes",
    "default_output_path",
    "load_model",
    "save_model",
    "as_ir_model",
    "parse_pipeline",
    "validate_sequence",
]
