"""Quality of a model on a text: perplexity, and its distance to a reference model.

``evaluate`` runs a plain export over whole windows and a KV model as it is deployed (chunked
prefill, then decode with the cache), optionally in fp16 simulation, and reports perplexity,
top-1 accuracy, and against a reference top-1 agreement and KL divergence per token. It sits
above the stages: it drives models through the runtime and reads the reference model's text.
"""

from __future__ import annotations

from .evaluate import DEFAULT_WINDOW, EvalResult, evaluate
from .text import cut_windows, find_tokenizer, read_text

__all__ = ["DEFAULT_WINDOW", "EvalResult", "evaluate", "cut_windows", "find_tokenizer", "read_text"]
