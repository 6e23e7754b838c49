"""subfunctions: each repeated decoder layer becomes a call of one ONNX function.

Compilers and runtimes that take ONNX functions (the Cloud AI compiler with ``-sub-functions``)
then see one body per kind of layer instead of one copy per layer.
"""

from __future__ import annotations

__all__ = ["SubfunctionsPass", "SubfunctionsOptions"]

import collections
import dataclasses
import logging
from typing import Any

import networkx as nx
import onnx_ir as ir

from qeff.errors import UnsupportedGraphError
from qeff.passes.infra.base import INT32_MAX, QeffPass, QeffPassResult
from qeff.passes.subfunctions.checks import function_problems
from qeff.passes.subfunctions.outline import DOMAIN, Kind, outline_kind, plan_kind, remove_unused_constants
from qeff.passes.subfunctions.regions import find_regions
from qeff.passes.subfunctions.signature import RegionForm, region_form

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SubfunctionsOptions:
    min_calls: int = dataclasses.field(
        default=2, metadata={"help": "layers a kind needs to become a function (fewer stay inline)",
                             "min": 2, "max": INT32_MAX})


class SubfunctionsPass(QeffPass):
    """Outline each kind of decoder layer into one ONNX function and call it once per layer.

    Rules:
    1. Layer regions come from :mod:`.regions`: name scopes propose each node's layer, and the
       residual stream decides which nodes lie between a layer's entry and exit; shared glue
       (masks, rotary tables, shared shape arithmetic) stays in the main graph and is passed in.
    2. Layers whose canonical forms (:mod:`.signature`) are equal are one kind; each kind with
       at least ``min_calls`` layers becomes one function in the domain ``qeff.subfunctions``
       (``DecoderLayer``, or ``DecoderLayer0``, ``DecoderLayer1``, ... with several kinds).
    3. Weights and per-layer constants that differ are formal inputs; small constants equal in
       every layer of a kind (shapes, axes, indices, scales) stay in the body. Integer
       constants are part of the form: layers that differ in one are different kinds.
    4. Graph inputs and outputs keep their names: KV cache inputs go into the calls and the
       retained-state outputs come out of them.
    5. Layers that match no other layer, or a kind with fewer than ``min_calls`` layers, stay
       inline; the report lists each with its reason.
    6. Refused before anything changes: calls that would form a cycle. Checked after
       (``ensures``): no reduction axes or ``Expand`` shape reaches a function as an input
       where the call passes a constant, and no constant ``Gather`` index is out of range.
    7. It is the last pass (``last``): a pass after it would see only the main graph, so the
       pipeline refuses one.
    """

    name = "subfunctions"
    summary = "outline each kind of repeated decoder layer into one ONNX function, called once per layer"
    Options = SubfunctionsOptions
    once = True
    last = True

    def requires(self, model: ir.Model) -> None:
        """A model whose layers are already functions of this pass is refused."""
        if any(f.domain == DOMAIN for f in model.functions.values()):
            raise UnsupportedGraphError("subfunctions: the model's layers are already functions",
                                        "run the pass on the flat model")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes_before, bytes_before = len(graph), onnx_bytes(model)
        graph.sort()
        outputs = {id(v) for v in graph.outputs}
        forms = [region_form(layer, nodes, outputs) for layer, nodes in find_regions(graph).items()]
        kinds, inline = self._kinds(forms)
        details: dict[str, Any] = {"layers": len(forms)}
        if not kinds:
            details.update(functions={}, inline=inline, nodes_before=nodes_before, nodes_after=nodes_before)
            logger.warning("subfunctions: no repeated layer found (%d layer regions)", len(forms))
            return QeffPassResult(model, False, details=details)
        _refuse_cycles(graph, kinds)
        candidates = [v for kind in kinds for form in kind.forms for v in form.slots]
        functions = []
        replaced: dict[int, ir.Value] = {}
        for kind in kinds:
            function = outline_kind(model, kind, replaced)
            model.functions[function.identifier()] = function
            functions.append((kind, function))
        model.opset_imports.setdefault(DOMAIN, 1)
        remove_unused_constants(graph, candidates)
        graph.sort()
        bytes_after = onnx_bytes(model)
        details.update(
            functions={k.name: {"calls": len(k.forms), "layers": _ranges(k.layers), "body_nodes": len(f),
                                "inputs": len(f.inputs), "outputs": len(f.outputs)} for k, f in functions},
            nodes_before=nodes_before, nodes_after=len(graph), onnx_bytes_before=bytes_before,
            onnx_bytes_after=bytes_after,
        )
        if inline:
            details["inline"] = inline
        logger.info("subfunctions: %s", ", ".join(f"{k.name} x{len(k.forms)}" for k in kinds))
        manifest = {"subfunctions": {"domain": DOMAIN,
                                     "functions": {k.name: {"layers": k.layers} for k in kinds}}}
        return QeffPassResult(model, True, details=details, manifest=manifest)

    def ensures(self, model: ir.Model) -> None:
        """What the Cloud AI compiler needs inside functions (:mod:`.checks`)."""
        problems = function_problems(model, DOMAIN)
        if problems:
            raise UnsupportedGraphError(f"subfunctions: {problems[0]}"
                                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                                        "report this model; run without subfunctions in the meantime")

    def _kinds(self, forms: list[RegionForm]) -> tuple[list[Kind], dict[str, str]]:
        """The kinds to outline, and the layers left inline with the reason."""
        groups: dict[Any, list[RegionForm]] = collections.defaultdict(list)
        for form in forms:
            if form.key is not None:
                groups[form.key].append(form)
        kept = [g for g in groups.values() if len(g) >= self.options.min_calls]
        largest = max(groups.values(), key=len, default=None)
        inline: dict[str, str] = {}
        for form in forms:
            if form.key is None:
                inline[str(form.layer)] = form.reason
            elif len(groups[form.key]) < self.options.min_calls:
                inline[str(form.layer)] = _difference(form, largest) if largest and largest[0] is not form else \
                    f"its kind has {len(groups[form.key])} layer(s), fewer than min_calls={self.options.min_calls}"
        names = ["DecoderLayer"] if len(kept) == 1 else [f"DecoderLayer{i}" for i in range(len(kept))]
        return [plan_kind(name, group) for name, group in zip(names, kept)], inline


def _difference(form: RegionForm, group: list[RegionForm]) -> str:
    """Why ``form`` is not of ``group``'s kind, in words."""
    ref = group[0]
    more, fewer = form.ops - ref.ops, ref.ops - form.ops
    if more or fewer:
        change = ", ".join([*(f"+{n} {op}" for op, n in sorted(more.items())),
                            *(f"-{n} {op}" for op, n in sorted(fewer.items()))])
        return f"not isomorphic to layer {ref.layer}: {len(form.nodes)} nodes vs {len(ref.nodes)} ({change})"
    return (f"not isomorphic to layer {ref.layer}: the same {len(form.nodes)} ops, wired differently or with "
            "different attributes or integer constants")


def _ranges(layers: list[int]) -> str:
    """``0-3,5``: a list of layer indices, short."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _refuse_cycles(graph: ir.Graph, kinds: list[Kind]) -> None:
    """Replacing each layer by one node must leave the graph acyclic."""
    group: dict[ir.Node, Any] = {n: ("layer", f.layer) for k in kinds for f in k.forms for n in f.nodes}
    dag = nx.DiGraph()
    for node in graph:
        here = group.get(node, node)
        dag.add_node(here)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is graph:
                there = group.get(producer, producer)
                if there != here:
                    dag.add_edge(there, here)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        layers = sorted({x[1] for edge in cycle for x in edge if isinstance(x, tuple)})
        raise UnsupportedGraphError(f"subfunctions: calls for layers {layers} would depend on each other in a cycle",
                                    "report this model; run without subfunctions in the meantime")


def onnx_bytes(model: ir.Model) -> int:
    """The model's ``.onnx`` size without reading a weight: nodes, value infos and functions
    as serialized, plus the bytes of the initializers."""
    size = 0
    for node in model.graph:
        size += ir.serde.serialize_node(node).ByteSize()
        size += sum(ir.serde.serialize_value(v).ByteSize() for v in node.outputs if v.type is not None)
    for function in model.functions.values():
        size += ir.serde.serialize_function(function).ByteSize()
    size += sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return size
