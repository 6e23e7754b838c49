"""The Session interface every backend implements (DESIGN §5): specs, specializations, run, reset.

A KV-cache model has *retained state*: each ``past_*`` input is paired with a
retained-state output (:mod:`qeff.contract`). A session keeps that state inside the backend between calls
(device memory on the card, bound OrtValues on onnxruntime): ``run`` takes the other inputs,
returns the other outputs, and the next call reads the state the previous one wrote. Passing a
``past_*`` array in ``run`` replaces the state with it; ``reset`` zeroes it; ``state()`` copies
it out (for tests and debugging; never needed to generate).
"""

from __future__ import annotations

__all__ = ["TensorSpec", "Session"]

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from qeff import contract
from qeff.errors import QeffError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, element type and dims (numbers or symbol names)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def check(self, array: np.ndarray, sizes: Mapping[str, int] | None = None) -> None:
        """A clear error when ``array`` cannot feed this input."""
        if array.dtype != self.dtype:
            raise QeffError(f"input {self.name!r} must be {self.dtype}, got {array.dtype}",
                            f"convert it with .astype(np.{self.dtype})")
        if array.ndim != len(self.shape):
            raise QeffError(f"input {self.name!r} must have {len(self.shape)} dims {self.shape}, got {array.shape}")
        for dim, size in zip(self.shape, array.shape):
            want = dim if isinstance(dim, int) else (sizes or {}).get(dim) if isinstance(dim, str) else None
            if want is not None and want != size:
                raise QeffError(f"input {self.name!r} has shape {array.shape}, the model wants {self.shape}"
                                + (f" with {dim}={want}" if isinstance(dim, str) else ""))


class Session(abc.ABC):
    """A loaded model that runs one call at a time (see the module docstring)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: The shapes the model was compiled for, as symbol -> size (empty: any shape).
    specializations: list[dict[str, int]]

    @property
    def retained(self) -> dict[str, str]:
        """{past input: retained-state output} kept in the backend between calls."""
        return contract.retained_pairs((i.name for i in self.inputs), (o.name for o in self.outputs))

    @property
    def input_names(self) -> list[str]:
        """The inputs ``run`` needs (retained-state inputs excluded)."""
        retained = self.retained  # once: it is computed from the specs at every read
        return [i.name for i in self.inputs if i.name not in retained]

    @property
    def output_names(self) -> list[str]:
        """The outputs ``run`` returns (retained-state outputs excluded)."""
        kept = set(self.retained.values())
        return [o.name for o in self.outputs if o.name not in kept]

    @property
    def vocab_size(self) -> int | None:
        """How many token ids the model takes: the static last dim of ``logits``, if any."""
        for o in self.outputs:
            if o.name == contract.LOGITS and o.shape and isinstance(o.shape[-1], int) and o.shape[-1] > 0:
                return o.shape[-1]
        return None

    def spec(self, name: str) -> TensorSpec:
        for s in (*self.inputs, *self.outputs):
            if s.name == name:
                return s
        raise QeffError(f"the model has no input or output {name!r}",
                        f"inputs: {', '.join(i.name for i in self.inputs)}")

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; returns ``output_names``. Retained state stays in the backend."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Zero the retained state (a fresh cache)."""

    @abc.abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """A copy of the retained state, by input name."""

    def close(self) -> None:
        """Release the backend's resources; the session cannot run afterwards."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        known = {i.name for i in self.inputs}
        unknown = [n for n in feeds if n not in known]
        if unknown:
            raise QeffError(f"the model has no input {unknown[0]!r}", f"its inputs: {', '.join(sorted(known))}")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise QeffError(f"input {missing[0]!r} is missing", f"run() needs {', '.join(self.input_names)}")
