"""What each pass changed: timing, node counts per op type, initializers, bytes.

Snapshots read only graph structure and tensor metadata (``nbytes`` of an external tensor is
known without reading it), so reporting costs nothing on multi-gigabyte models.
"""

from __future__ import annotations

__all__ = ["GraphSnapshot", "PassRecord", "Report"]

import collections
import dataclasses
import json
import os
from typing import Any

import onnx_ir as ir

from qeff.common.atomic import write_text_atomic


@dataclasses.dataclass
class GraphSnapshot:
    ops: collections.Counter
    initializers: dict[str, int]  # name -> id(const_value), to see replaced tensors
    nbytes: int
    inputs: list[str]
    outputs: list[str]

    @classmethod
    def take(cls, model: ir.Model) -> GraphSnapshot:
        ops: collections.Counter = collections.Counter()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            ops[key] += 1
        inits = {}
        nbytes = 0
        for name, value in model.graph.initializers.items():
            inits[name] = id(value.const_value)
            if value.const_value is not None:
                nbytes += value.const_value.nbytes
        return cls(
            ops=ops,
            initializers=inits,
            nbytes=nbytes,
            inputs=[v.name for v in model.graph.inputs],
            outputs=[v.name for v in model.graph.outputs],
        )

    @property
    def nodes(self) -> int:
        return sum(self.ops.values())


@dataclasses.dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    ops_delta: dict[str, int]
    initializers_before: int
    initializers_after: int
    initializers_added: int
    initializers_removed: int
    initializers_replaced: int
    bytes_before: int
    bytes_after: int
    inputs_removed: list[str]
    inputs_added: list[str]
    outputs_removed: list[str]
    outputs_added: list[str]
    details: dict[str, Any]

    @classmethod
    def compare(
        cls,
        name: str,
        options: dict[str, Any],
        seconds: float,
        modified: bool,
        before: GraphSnapshot,
        after: GraphSnapshot,
        details: dict[str, Any],
    ) -> PassRecord:
        delta = {
            op: after.ops[op] - before.ops[op]
            for op in sorted(set(before.ops) | set(after.ops))
            if after.ops[op] != before.ops[op]
        }
        kept = set(before.initializers) & set(after.initializers)
        return cls(
            name=name,
            options=options,
            seconds=seconds,
            modified=modified,
            nodes_before=before.nodes,
            nodes_after=after.nodes,
            ops_delta=delta,
            initializers_before=len(before.initializers),
            initializers_after=len(after.initializers),
            initializers_added=len(set(after.initializers) - kept),
            initializers_removed=len(set(before.initializers) - kept),
            initializers_replaced=sum(
                1 for n in kept if before.initializers[n] != after.initializers[n]
            ),
            bytes_before=before.nbytes,
            bytes_after=after.nbytes,
            inputs_removed=[n for n in before.inputs if n not in after.inputs],
            inputs_added=[n for n in after.inputs if n not in before.inputs],
            outputs_removed=[n for n in before.outputs if n not in after.outputs],
            outputs_added=[n for n in after.outputs if n not in before.outputs],
            details=details,
        )


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclasses.dataclass
class Report:
    """The run of one pipeline: a record per pass plus verification results."""

    input: str | None = None
    output: str | None = None
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    # A qeff.verify.Verification when the pipeline was verified (anything with to_dict()).
    verification: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "total_seconds": sum(p.seconds for p in self.passes),
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def rich_table(self):
        from rich.table import Table

        table = Table(title="qeff-opt passes", title_justify="left")
        for col, justify in (
            ("pass", "left"),
            ("time", "right"),
            ("nodes", "right"),
            ("ops changed", "left"),
            ("initializers", "right"),
            ("notes", "left"),
        ):
            table.add_column(col, justify=justify)
        for p in self.passes:
            ops = ", ".join(f"{op} {d:+d}" for op, d in sorted(p.ops_delta.items(), key=lambda kv: kv[1]))
            init_change = f"{p.initializers_before}→{p.initializers_after}"
            if p.initializers_replaced:
                init_change += f", {p.initializers_replaced} rewritten"
            if p.bytes_before != p.bytes_after:
                init_change += f"\n{_fmt_bytes(p.bytes_before)}→{_fmt_bytes(p.bytes_after)}"
            notes = "; ".join(
                _summarize_detail(k, v) for k, v in p.details.items() if v not in (0, False, None, [], {})
            )
            io = []
            if p.inputs_removed and "inputs_removed" not in p.details:
                io.append("inputs −" + ",".join(p.inputs_removed))
            if p.inputs_added:
                io.append("inputs +" + ",".join(p.inputs_added))
            if p.outputs_added:
                io.append("outputs +" + ",".join(p.outputs_added))
            notes = "; ".join(x for x in [notes, *io] if x)
            table.add_row(
                p.name,
                f"{p.seconds:.2f} s",
                f"{p.nodes_before}→{p.nodes_after}",
                ops or "—",
                init_change,
                notes or ("no change" if not p.modified else ""),
            )
        return table


def _summarize_detail(key: str, value: Any) -> str:
    if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
        return f"{key}: {len(value)} (table below, all in --report)"  # e.g. per-weight errors
    if isinstance(value, dict):
        inner = ", ".join(f"{k} {v}" for k, v in list(value.items())[:6])
        more = f", +{len(value) - 6} more" if len(value) > 6 else ""
        return f"{key}: {inner}{more}"
    if isinstance(value, list):
        return f"{key}: {', '.join(map(str, value[:4]))}" + (f" +{len(value) - 4}" if len(value) > 4 else "")
    return f"{key}: {value}"
