"""Finding the nodes of each decoder layer.

Rules:

1. **Anchors.** A node names its layer in dynamo's name scopes (``pkg.torch.onnx.name_scopes``
   metadata) or in its TorchScript name (``/m/model/layers.3/...``); the last ``layers.N``,
   ``h.N``, ``blocks.N``, ... it contains is its anchor. Names only propose layers: whether
   layers are the same is decided on the structure (:mod:`.signature`).
2. **The stream.** The residual stream is everything that depends on the values of the
   token input (``input_ids``, else ``inputs_embeds``, else the first input), not through
   ``Shape``/``Size``. A stream node belongs to layer L when the anchors it depends on end at
   L and the anchors that depend on it start at L: it lies between the boundary entering
   layer L and the one leaving it. Stream nodes before the first layer (the embedding) and
   after the last (final norm, lm_head) are glue.
3. **Side nodes.** A node off the stream (shape arithmetic, a per-layer mask or table) joins
   layer L when every node that reads it is in layer L and it is no graph output; one read
   by several layers (a mask or rotary table shared by all) stays glue and is passed to each
   call. ``Constant`` nodes never join a layer: constants are handled per input slot.
4. **Convexity.** Glue that both depends on a layer and feeds it joins that layer, so that
   replacing the layer by one call cannot create a cycle.
"""

from __future__ import annotations

__all__ = ["LAYER_RE", "layer_of", "find_regions", "stream_sources"]

import re

import onnx_ir as ir

from qeff.passes.ir.traversal import SHAPE_OPS

# The layer containers of Hugging Face decoders (``model.layers``, ``transformer.h``, ...).
LAYER_RE = re.compile(r"(?:^|[./'])(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)(?=$|[./'])")
_SCOPES = "pkg.torch.onnx.name_scopes"
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")
_FAR = 1 << 30


def layer_of(node: ir.Node) -> int | None:
    """The layer index a node's name scope or name gives, or None."""
    for text in (node.metadata_props.get(_SCOPES), node.name):
        if text:
            found = LAYER_RE.findall(text)
            if found:
                return int(found[-1])
    return None


def stream_sources(graph: ir.Graph) -> list[ir.Value]:
    """The token input the residual stream starts from."""
    by_name = {v.name: v for v in graph.inputs}
    for name in _TOKEN_INPUTS:
        if name in by_name:
            return [by_name[name]]
    return list(graph.inputs[:1])


def _stream(graph: ir.Graph) -> set[ir.Node]:
    """Nodes that depend on the token input's values (not through shape ops)."""
    seen: set[ir.Node] = set()
    stack = [use.node for v in stream_sources(graph) for use in v.uses()]
    while stack:
        node = stack.pop()
        if node in seen or node.op_type in SHAPE_OPS or node.graph is not graph:
            continue
        seen.add(node)
        stack.extend(use.node for out in node.outputs for use in out.uses())
    return seen


def find_regions(graph: ir.Graph) -> dict[int, list[ir.Node]]:
    """Layer index -> that layer's nodes, in graph order (the graph must be sorted)."""
    order = list(graph)
    position = {node: i for i, node in enumerate(order)}
    anchors = {node: layer_of(node) for node in order}
    stream = _stream(graph)
    depth: dict[ir.Node, int] = {}
    for node in order:
        if node not in stream:
            continue
        d = anchors[node] if anchors[node] is not None else -1
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer in stream:
                d = max(d, depth[producer])
        depth[node] = d
    height: dict[ir.Node, int] = {}
    for node in reversed(order):
        if node not in stream:
            continue
        h = anchors[node] if anchors[node] is not None else _FAR
        for out in node.outputs:
            for use in out.uses():
                if use.node in stream and use.node.graph is graph:
                    h = min(h, height[use.node])
        height[node] = h
    region: dict[ir.Node, int] = {n: depth[n] for n in stream if depth[n] == height[n] and depth[n] >= 0}
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(order):
        if node in stream or node.op_type == "Constant":
            continue
        layers = {region.get(use.node) for out in node.outputs for use in out.uses()}
        used = any(out.uses() for out in node.outputs)
        if used and len(layers) == 1 and None not in layers and not any(id(o) in outputs for o in node.outputs):
            region[node] = layers.pop()
    _make_convex(region, position)
    regions: dict[int, list[ir.Node]] = {}
    for node in order:
        if node in region:
            regions.setdefault(region[node], []).append(node)
    return dict(sorted(regions.items()))


def _make_convex(region: dict[ir.Node, int], position: dict[ir.Node, int]) -> None:
    """Add to each layer the glue nodes on a path that leaves the layer and comes back."""
    layers = sorted(set(region.values()))
    for layer in layers:
        members = [n for n, l in region.items() if l == layer]
        below = _reach(members, region, forward=True, position=position)
        above = _reach(members, region, forward=False, position=position)
        for node in below & above:
            region[node] = layer


def _reach(members: list[ir.Node], region: dict[ir.Node, int], *, forward: bool,
           position: dict[ir.Node, int]) -> set[ir.Node]:
    """Glue nodes reachable from ``members`` through glue only (downstream or upstream)."""
    seen: set[ir.Node] = set()
    stack = list(members)
    while stack:
        node = stack.pop()
        if forward:
            nexts = [use.node for out in node.outputs for use in out.uses()]
        else:
            nexts = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        for n in nexts:
            if n not in region and n in position and n not in seen:
                seen.add(n)
                stack.append(n)
    return seen
