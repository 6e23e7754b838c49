"""Lazy access to the optional export dependencies (torch and transformers).

``qeff.frontend`` must import on a machine without torch: the graph passes only need onnx.
Every function that touches torch goes through :func:`require_torch` so that a missing extra
becomes one clear :class:`~qeff.errors.MissingDependencyError` instead of an ImportError
somewhere deep inside.
"""

from __future__ import annotations

import logging
from types import ModuleType

from qeff.errors import MissingDependencyError

logger = logging.getLogger(__name__)

_MESSAGE = "exporting needs torch and transformers"
_HINT = "pip install 'qeff-opt[export]' torch==2.13.0"


def require_torch() -> tuple[ModuleType, ModuleType]:
    """Return ``(torch, transformers)``, or raise MissingDependencyError if either is missing."""
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        logger.debug("optional export dependency missing: %s", exc)
        raise MissingDependencyError(_MESSAGE, _HINT) from exc
    return torch, transformers
