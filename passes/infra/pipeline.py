"""Parsing ``--passes`` text into configured passes, and checking the order they run in.

Grammar: passes are separated by commas; a pass may carry options after a colon,
themselves separated by commas: ``kv:ctx_len=256,fixed:seq_len=1,batch_size=1,fp16clip``.
A comma-separated item that contains ``=`` but no ``:`` continues the options of the pass
before it, so ``fixed:seq_len=1,batch_size=1`` is one pass with two options.

Order rules (checked before anything runs):
- every name must be registered;
- a pass listed in another's ``requires_passes`` must have run earlier, in this pipeline or in
  one already applied to the model (recorded in the model's ``qeff.passes`` metadata);
- a ``once`` pass may appear only once across both;
- no pass may follow a ``last`` pass.
"""

from __future__ import annotations

__all__ = ["PassSpec", "parse_pipeline", "build_passes", "validate_sequence", "applied_passes"]

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from qeff.errors import PassOptionError, PassSequenceError
from qeff.passes.infra.base import PASS_REGISTRY, QeffPass, get_pass

logger = logging.getLogger(__name__)

HISTORY_KEY = "qeff.passes"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass
class PassSpec:
    name: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Split pipeline text into pass names and raw option strings (see the module docstring)."""
    specs: list[PassSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs:
                raise PassOptionError(
                    f"option {item!r} comes before any pass name",
                    "write options after the pass they belong to, e.g. fold:max_elements=4096",
                )
            _add_option(specs[-1], item)
            continue
        name, _, rest = item.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise PassOptionError(
                f"{name!r} is not a pass name",
                "pass lists look like kv,fixed:seq_len=1,batch_size=1,fp16clip",
            )
        spec = PassSpec(name)
        specs.append(spec)
        if rest.strip():
            _add_option(spec, rest)
    if not specs:
        raise PassOptionError("the pass list is empty", "name at least one pass, e.g. --passes cleanup")
    return specs


def _add_option(spec: PassSpec, item: str) -> None:
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not _KEY.match(key):
        raise PassOptionError(
            f"malformed option {item.strip()!r} for pass {spec.name!r}",
            "options are written key=value, e.g. fold:max_elements=4096",
        )
    if key in spec.options:
        raise PassOptionError(f"option {key!r} given twice for pass {spec.name!r}", "give it once")
    spec.options[key] = value.strip()


def build_passes(specs: Sequence[PassSpec], overrides: dict[str, str] | None = None) -> list[QeffPass]:
    """Instantiate passes; ``overrides`` (e.g. ``--ctx-len``) apply to passes that have the option."""
    passes = []
    overrides = overrides or {}
    for spec in specs:
        cls = get_pass(spec.name)
        field_names = {f.name for f in dataclasses.fields(cls.Options)}
        options = {k: v for k, v in overrides.items() if k in field_names}
        options.update(spec.options)
        passes.append(cls.from_text(options))
    unused = [k for k in overrides if not any(k in _fields(p) for p in passes)]
    if unused:
        raise PassOptionError(
            f"--{unused[0].replace('_', '-')} was given but no pass in the list takes it",
            "drop the flag or add a pass that uses it",
        )
    return passes


def _fields(p: QeffPass) -> set[str]:
    return {f.name for f in dataclasses.fields(p.Options)}


def applied_passes(model: ir.Model) -> list[dict[str, Any]]:
    """Passes already applied to the model by an earlier qeff-opt run."""
    raw = model.metadata_props.get(HISTORY_KEY)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s metadata", HISTORY_KEY)
        return []
    return [h for h in history if isinstance(h, dict) and "name" in h]


def validate_sequence(passes: Sequence[QeffPass], history: Sequence[dict[str, Any]] = ()) -> None:
    """Raise PassSequenceError if the pipeline breaks an order rule (module docstring)."""
    done = [h["name"] for h in history]
    for p in passes:
        final = next((n for n in done if n in PASS_REGISTRY and PASS_REGISTRY[n].last), None)
        if final is not None:
            raise PassSequenceError(f"pass {p.name!r} cannot run after {final!r}, which must be the last pass",
                                    f"run {p.name} before {final}")
        for needed in p.requires_passes:
            if needed not in done:
                raise PassSequenceError(
                    f"pass {p.name!r} needs {needed!r} to run before it",
                    f"put {needed} earlier in --passes",
                )
        if p.once and p.name in done:
            applied = any(h["name"] == p.name for h in history)
            where = "is already applied to this model" if applied else "is listed twice"
            raise PassSequenceError(
                f"pass {p.name!r} can be applied only once and {where}",
                f"remove the second {p.name}",
            )
        done.append(p.name)
