"""The MX element formats (OCP Microscaling Formats v1.0, DESIGN §3.4) and their options."""

from __future__ import annotations

__all__ = ["ElementFormat", "FORMATS", "element_format", "ROUNDINGS", "SCALE_RULES", "INT8_RANGES"]

import dataclasses
import difflib

from qeff.errors import PassOptionError

ROUNDINGS = ("even", "nearest")  # ties to even / ties away from zero
SCALE_RULES = ("ocp", "ocp_plus1")  # shared exponent floor(log2 amax) - emax (+1)
INT8_RANGES = ("symmetric", "full")  # codes ±127 / -128..127


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """An element grid: binades 2^emin … 2^emax with ``mbits`` mantissa bits, saturating at
    ``max_norm``. int8 is the grid of code/64: one binade-free quantum 2^-6 (emin 0, 6 bits)."""

    name: str
    emax: int
    emin: int
    mbits: int
    max_norm: float

    def max_negative(self, int8: str) -> float:
        """The magnitude negative elements saturate at (int8 ``full`` adds the code −128)."""
        return 2.0 if self.name == "int8" and int8 == "full" else self.max_norm


FORMATS = {f.name: f for f in (
    ElementFormat("fp8_e4m3", 8, -6, 3, 448.0),
    ElementFormat("fp8_e5m2", 15, -14, 2, 57344.0),
    ElementFormat("fp6_e3m2", 4, -2, 2, 28.0),
    ElementFormat("fp6_e2m3", 2, 0, 3, 7.5),
    ElementFormat("fp4_e2m1", 2, 0, 1, 6.0),
    ElementFormat("int8", 0, 0, 6, 127 / 64),
)}


def element_format(name: str) -> ElementFormat:
    try:
        return FORMATS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(FORMATS), n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + f"formats: {', '.join(FORMATS)}"
        raise PassOptionError(f"unknown MX element format {name!r}", hint) from None


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PassOptionError(f"unknown {what} {value!r}", f"choose one of: {', '.join(choices)}")
