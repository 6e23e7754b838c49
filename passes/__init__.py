"""qeff.passes: the rewriting stage.

Layout (each pass family in its own subpackage, single-file passes as plain modules):

- ``infra``: the pass base and registry, the pipeline grammar, the manager, the report;
- ``ir``: IR helpers every pass may use (model I/O, node builder, constants, graph walks,
  symbolic shapes, sample inputs);
- ``cleanup``, ``fold``, ``fixed``: single-file passes;
- ``kv``: the KV-cache pass (match → plan → rewrite, and the ops it builds);
- ``fp16``: the fp16clip pass (masks, calibration) and the fp16 simulation;
- ``mx``: the MX kernel and the MX weight and KV-cache passes;
- ``subfunctions``: outlining repeated decoder layers into ONNX functions.

Importing this package registers every built-in pass in ``PASS_REGISTRY``. Nothing here
imports another stage (the runtime, the backend) or torch.
"""

from __future__ import annotations

from qeff.passes.ccl import CCLPass
from qeff.passes.cleanup import CleanupPass
from qeff.passes.fixed import FixedPass
from qeff.passes.fold import FoldPass
from qeff.passes.fp16.fp16clip import FP16ClipPass
from qeff.passes.infra.base import PASS_REGISTRY, NoOptions, QeffPass, QeffPassResult, describe_options, get_pass
from qeff.passes.infra.manager import PipelineResult, default_output_path, run_passes
from qeff.passes.infra.pipeline import parse_pipeline, validate_sequence
from qeff.passes.ir.model_io import as_ir_model, load_model, save_model
from qeff.passes.kv.kv_pass import KVPass
from qeff.passes.mx.kv import MXINT8KVPass
from qeff.passes.mx.weights import MXFP4Pass, MXFP6Pass, MXFP8Pass, MXINT8Pass
from qeff.passes.subfunctions.subfunctions_pass import SubfunctionsPass
from qeff.passes.spec import SpecPass

__all__ = [
    "PASS_REGISTRY",
    "QeffPass",
    "QeffPassResult",
    "NoOptions",
    "get_pass",
    "describe_options",
    "CCLPass",
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
    "SubfunctionsPass",
    "SpecPass",
    "PipelineResult",
    "run_passes",
    "default_output_path",
    "load_model",
    "save_model",
    "as_ir_model",
    "parse_pipeline",
    "validate_sequence",
]
