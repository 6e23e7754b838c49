"""qeff.runtime: sessions on onnxruntime and on the Cloud AI 100 runtime, and generation (DESIGN §5).

- :class:`Session`: the interface (specs, specializations, ``run``, retained state, ``reset``).
- :class:`OrtSession`: onnxruntime, with the KV cache kept in bound OrtValues.
- ``AicSession`` (``qeff.runtime.aic``): the card, through the ``_qaicrt`` C extension.
- :func:`generate`: chunked prefill, greedy or sampled decoding, continuous batching, stats.
"""

from qeff.runtime.generate import GenerationResult, GenerationStats, Sampler, generate
from qeff.runtime.ort import OrtSession
from qeff.runtime.session import Session, TensorSpec

__all__ = ["Session", "TensorSpec", "OrtSession", "generate", "GenerationResult", "GenerationStats", "Sampler"]
