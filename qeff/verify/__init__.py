"""qeff.verify: does the rewritten model compute what the original did?

Verification needs both the passes (the fp16 simulation, sample inputs) and the runtime (KV
models are driven the way a serving loop drives them), so it sits above both stages.

- :func:`verify_pipeline`: the check ``--verify`` runs after a pipeline, chosen from the
  rewritten model's interface: a KV model by greedy generation against the original graph
  recomputing the whole sequence, any other model on the same inputs;
- :class:`Verification`: the one typed result, with :func:`describe` and
  :func:`failure_message` as the one place that words it.
"""

from qeff.verify.generation import greedy_reference, verify_kv_model
from qeff.verify.outputs import compare_outputs, relative_difference, verify_models
from qeff.verify.pipeline import FP16_TOLERANCE, FP32_TOLERANCE, verify_pipeline
from qeff.verify.result import Verification, describe, failure_message

__all__ = [
    "Verification", "describe", "failure_message", "verify_pipeline", "verify_models", "verify_kv_model",
    "greedy_reference", "compare_outputs", "relative_difference", "FP32_TOLERANCE", "FP16_TOLERANCE",
]
