"""The pass base class, typed pass options and the name registry.

A qeff pass is an ``onnx_ir.passes.InPlacePass`` with a few class attributes that let the
manager resolve it by name, parse its options from text, check the order of a pipeline and
record what it did:

- ``name`` / ``summary``: the CLI name and a one-line description for ``--list-passes``;
- ``Options``: a dataclass whose typed fields are the pass's options (``name:key=value``);
  a numeric field's metadata may bound it (``"min"``, ``"max"``, ``"above"``: inclusive,
  inclusive, exclusive), floats must be finite, and every pass checks its options against
  their fields when it is built, from text or from Python (:func:`check_options`);
- ``requires``: passes that must have run before (in this pipeline or an earlier one);
- ``once``: the pass may be applied to a model at most once;
- ``last``: no pass may follow it (``subfunctions``: later passes would see only the main graph);
- ``lossy``: the pass changes the model's numbers by design (quantization);
- ``progress``: set by the manager when a progress bar may be shown (passes that walk every
  weight show one through :func:`qeff.common.progress.bytes_progress`).

``call`` returns a :class:`QeffPassResult`: besides the model and a truthful ``modified`` it
carries what the pass did (``details``, for the report), the manifest sections it sets
(``manifest``), and, for a pass that prepares the model for fp16 compute, the values the card
keeps in fp32 (``fp16_keep``). Nothing is stashed on the pass object between calls.

Subclassing registers the pass; ``PASS_REGISTRY`` maps names to classes.
"""

from __future__ import annotations

__all__ = ["QeffPass", "QeffPassResult", "NoOptions", "PASS_REGISTRY", "get_pass", "parse_option_value",
           "describe_options", "check_options", "INT32_MAX"]

import dataclasses
import difflib
import logging
import math
import numbers
import types
import typing
from typing import Any, ClassVar, Literal

import onnx_ir as ir

from qeff.errors import PassOptionError, QeffError

logger = logging.getLogger(__name__)

PASS_REGISTRY: dict[str, type[QeffPass]] = {}

# The usual upper bound of a size option: compilers and runtimes take sizes as int32, and a
# larger number is a typo rather than a model.
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """This pass takes no options."""


@dataclasses.dataclass
class QeffPassResult(ir.passes.PassResult):
    """What a qeff pass returns (see the module docstring)."""

    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    fp16_keep: tuple[str, ...] | None = None


class QeffPass(ir.passes.InPlacePass):
    """Base class of every qeff-opt pass (see the module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires_passes: ClassVar[tuple[str, ...]] = ()
    once: ClassVar[bool] = False
    # No pass may run after this one (it moves the graph where other passes do not look).
    last: ClassVar[bool] = False
    # The pass changes the model's numbers by design (quantization): --verify then reports the
    # difference and fails only on NaN/Inf, unless a tolerance is given.
    lossy: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return  # an abstract helper base
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass")
        previous = PASS_REGISTRY.get(cls.name)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise TypeError(f"pass name {cls.name!r} is taken by {previous.__qualname__}")
        PASS_REGISTRY[cls.name] = cls

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        check_options(self.name, options)
        self.options = options
        self.validate_options()
        self.progress = False

    def validate_options(self) -> None:
        """Checks across fields or inside text values that field bounds cannot express; a pass
        overrides it and raises :class:`PassOptionError`. Runs once, when the pass is built."""

    @classmethod
    def from_text(cls, text_options: dict[str, str]) -> QeffPass:
        """Build the pass from ``key=value`` strings, converting each value to its field type."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values: dict[str, Any] = {}
        for key, raw in text_options.items():
            if key not in fields:
                valid = ", ".join(fields) or "none"
                close = difflib.get_close_matches(key, list(fields), n=1)
                suggestion = f"did you mean {close[0]!r}? " if close else ""
                raise PassOptionError(
                    f"pass {cls.name!r} has no option {key!r}",
                    f"{suggestion}its options: {valid} (see qeff-opt --list-passes)",
                )
            try:
                values[key] = parse_option_value(raw, hints[key])
            except ValueError as e:
                raise PassOptionError(
                    f"{cls.name}: option {key}={raw!r} is invalid: {e}",
                    "see qeff-opt --list-passes for the accepted values",
                ) from None
        try:
            return cls(cls.Options(**values))
        except (TypeError, ValueError) as e:
            raise PassOptionError(f"{cls.name}: {e}", "see qeff-opt --list-passes") from None

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        # onnx-ir wraps what requires()/ensures() raise; a user-facing refusal surfaces as itself.
        try:
            return super().__call__(model_or_result)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as e:
            if isinstance(e.__cause__, QeffError):
                raise e.__cause__ from None
            raise


def get_pass(name: str) -> type[QeffPass]:
    """Look a pass up by its CLI name, suggesting the closest name when it is unknown."""
    try:
        return PASS_REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(PASS_REGISTRY), n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise PassOptionError(
            f"unknown pass {name!r}",
            f"{suggestion}available: {', '.join(sorted(PASS_REGISTRY))}",
        ) from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_option_value(raw: str, annotation: Any) -> Any:
    """Convert option text to ``annotation`` (int, float, bool, str, Literal, Optional, tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in {"none", ""}:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_option_value(raw, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if raw in args:
            return raw
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        item_type = args[0] if args else str
        return tuple(parse_option_value(part, item_type) for part in raw.split("|") if part)
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if annotation is str:
        return raw
    raise ValueError(f"unsupported option type {annotation!r}")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | none" if type(None) in args else "")
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return f"{_type_name(args[0]) if args else 'str'}|…"
    return getattr(annotation, "__name__", str(annotation))


def describe_options(pass_cls: type[QeffPass]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option; help comes from field metadata."""
    hints = typing.get_type_hints(pass_cls.Options)
    rows = []
    for field in dataclasses.fields(pass_cls.Options):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        type_name = _type_name(hints[field.name])
        bounds = _bounds_text(field)
        if bounds:
            base, sep, rest = type_name.partition(" | ")
            type_name = f"{base} {bounds}{sep}{rest}"
        rows.append((field.name, type_name, str(default), field.metadata.get("help", "")))
    return rows


def _bounds_text(field: dataclasses.Field) -> str:
    """``1..2147483647``, ``>= 0``, ``> 0``: the range an option's metadata allows."""
    low, high, above = (field.metadata.get(k) for k in ("min", "max", "above"))
    if low is not None and high is not None:
        return f"{low}..{high}"
    parts = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
             f"<= {high}" if high is not None else ""]
    return " ".join(p for p in parts if p)


def _concrete_types(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None members of an annotation, and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _hint(field: dataclasses.Field) -> str:
    """The hint of an error about a numeric option: its default as an example, when it has one."""
    default = field.default
    example = (f"e.g. {field.name}={default}; "
               if isinstance(default, numbers.Real) and not isinstance(default, bool) else "")
    return f"{example}qeff-opt --list-passes shows each option's type and range"


def _check_number(where: str, field: dataclasses.Field, value: Any, kind: Any) -> None:
    """``value`` against the field's numeric kind, finiteness and bounds."""
    name, meta = field.name, field.metadata
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
        what = "an integer" if kind is int else "a number"
        raise PassOptionError(f"{where}: option {name}={value!r} must be {what}", _hint(field))
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise PassOptionError(f"{where}: option {name}={value!r} must be a finite number", _hint(field))
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above)):
        return
    wanted = " and ".join(t for t in (f"at least {low}" if low is not None else "",
                                      f"greater than {above}" if above is not None else "",
                                      f"at most {high}" if high is not None else "") if t)
    raise PassOptionError(f"{where}: option {name}={value!r} must be {wanted}", _hint(field))


def check_options(pass_name: str, options: Any) -> None:
    """Check every field of a pass's ``options`` against its annotation and its metadata bounds.

    Both ways of building a pass meet here (``name:key=value`` text and ``Pass(Options(...))``),
    so an out-of-range value is refused before any model is read, whichever way it came in.
    """
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        kinds, optional = _concrete_types(hints[field.name])
        if value is None:
            if not optional:
                raise PassOptionError(f"{pass_name}: option {field.name} needs a value",
                                      "qeff-opt --list-passes shows each option's type")
            continue
        literal = next((k for k in kinds if typing.get_origin(k) is Literal), None)
        if literal is not None:
            choices = typing.get_args(literal)
            if value not in choices:
                raise PassOptionError(f"{pass_name}: option {field.name}={value!r} must be one of "
                                      f"{', '.join(map(str, choices))}", "qeff-opt --list-passes lists the choices")
            continue
        if isinstance(value, tuple):
            item = next((typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is tuple
                         and typing.get_args(k)), None)
            if item in (int, float):
                for element in value:
                    _check_number(pass_name, field, element, item)
        elif float in kinds:  # a float field takes an int too
            _check_number(pass_name, field, value, float)
        elif int in kinds:
            _check_number(pass_name, field, value, int)
