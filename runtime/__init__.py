"""qeff.runtime: sessions on onnxruntime and on the Cloud AI 100 runtime, and generation.

The contract is DESIGN.md §5; the implementation arrives with the runtime issue.
"""

__all__: list[str] = []
