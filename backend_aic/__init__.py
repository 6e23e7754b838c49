"""qeff.backend_aic: lowering rewritten models to the Cloud AI 100 compiler (qaic-compile).

The contract is DESIGN.md §4; the implementation arrives with the backend issue. Nothing here
pretends to compile yet.
"""

__all__: list[str] = []
