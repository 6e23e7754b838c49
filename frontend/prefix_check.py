"""Checking an export of any size: its first decoder layers against torch, on the same weights.

The full check (:func:`.check.compare_with_onnxruntime`) runs the torch model and the whole ONNX
model: twice the weights in memory. This one compares the hidden state after the first ``k``
decoder layers, computed both ways, and holds a few hundred MB of weights at most, whatever
the size of the model:

- **ONNX side: the written file, cut.** The graph is read without its weights. The hidden state
  after layer ``k - 1`` is the value that layer's nodes hand to the rest of the graph (nodes are
  placed in modules by the dynamo exporter's ``name_scopes`` metadata or by the TorchScript
  exporter's node names, ``/m/model/layers.0/...``). Only the nodes it depends on run: the
  later layers and the lm_head are never touched. They run under onnxruntime in stages of at
  most :data:`STAGE_BYTES` of weights, each stage a small model whose initializers point into
  the original data file, read in place (onnxruntime maps it: only the pages a stage reads
  become resident, an embedding's few rows included, and they go with the stage's session).
  Graph optimisations and weight pre-packing are off: both copy weights, and what is checked is
  the graph as written.
- **Torch side: the checkpoint, streamed.** The model skeleton (:func:`.streaming.build_skeleton`)
  runs forward with hooks: a module's large parameters are read from the checkpoint just before
  its forward and dropped right after it, and an embedding reads only the rows of the tokens it
  is given. A hook on layer ``k - 1`` keeps its output and stops the forward there. A model
  already in memory (an in-memory export) is used as it is.

Both sides run the same right-padded batch as the full check and are compared on valid tokens
only (:mod:`.check` says why). When the cut cannot be made with confidence (no list of decoder
layers in the model, no node of that layer in the graph, no value of the hidden state's shape
leaving it, or one that depends on later layers) :class:`PrefixCutNotFound` says so, and the
caller skips the check rather than compare the wrong tensors.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qeff.errors import ExportError

from ._deps import require_torch
from ._messages import exception_reason
from .export import input_names_for
from .inputs import padded_batch
from .safetensors_index import read_checkpoint
from .streaming_sources import Source, open_files, read_elements

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHECK_LAYERS", "STAGE_BYTES", "PrefixComparison", "PrefixCutNotFound", "compare_prefix"]

DEFAULT_CHECK_LAYERS = 2
# Weights per onnxruntime stage. A stage's pages stay resident until its session goes, so this
# bounds what the ONNX side holds; the largest single matrix of an 8B Llama (235 MB) fits.
STAGE_BYTES = 256 << 20
# Elements per read when a parameter is loaded whole: 16 MB of float32 at a time.
_CHUNK_ELEMENTS = 4 << 20
# Where the dynamo exporter records each node's module path.
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# The attribute under which the export wrapper holds the model (``export._wrap``).
_ROOT = "m"


class PrefixCutNotFound(Exception):
    """The hidden state after the first layers cannot be identified with confidence."""


@dataclass(frozen=True)
class PrefixComparison:
    """What :func:`compare_prefix` compared: the hidden state after ``layers`` of the model's
    ``total_layers`` decoder layers (the graph value ``output``) on ``valid_tokens`` tokens;
    ``max_abs_value`` is its largest magnitude in torch, the scale ``max_abs_diff`` is read on."""

    layers: int
    total_layers: int
    max_abs_diff: float
    max_abs_value: float
    valid_tokens: int
    output: str


def compare_prefix(
    onnx_path: str | os.PathLike[str],
    *,
    folder: str | os.PathLike[str] | None = None,
    model: Any = None,
    layers: int = DEFAULT_CHECK_LAYERS,
    attn_implementation: str = "eager",
    seed: int = 1,
    batch: int = 2,
    seq: int = 7,
) -> PrefixComparison:
    """Max absolute difference of the hidden state after the first ``layers`` decoder layers
    between ``onnx_path`` (under onnxruntime) and torch, on valid tokens of a right-padded batch.

    The torch side is ``model`` when given (already in memory), else the checkpoint ``folder``
    read module by module. Raises :class:`PrefixCutNotFound` when the comparison cannot be set
    up for this architecture, ExportError when the file does not have a causal LM's inputs.
    """
    torch, _ = require_torch()
    if (folder is None) == (model is None):
        raise ValueError("give exactly one of folder and model")
    if layers < 1:
        raise ExportError(f"cannot check {layers} layers", "check at least one layer")
    weights = None
    if model is None:
        model, weights = _streamed_model(folder, attn_implementation)
    layers_name, decoder_layers = _decoder_layer_list(model)
    count = min(layers, len(decoder_layers))

    # The cut first: a graph it cannot be found in costs no forward pass.
    graph_model = _read_graph(onnx_path)
    scope = f"{_ROOT}.{layers_name}.{count - 1}"
    candidates = _values_leaving(graph_model.graph, scope)
    nodes = _nodes_needed(graph_model.graph, candidates)
    _refuse_later_layers(nodes, layers_name, count)

    generator = torch.Generator().manual_seed(int(seed))
    feeds = padded_batch(batch, seq, int(model.config.vocab_size), pad=2, generator=generator)
    feeds = {name: feeds[name] for name in input_names_for(model)}
    onnx_feeds = _onnx_feeds(graph_model, feeds, onnx_path)
    expected = _torch_hidden_state(model, decoder_layers[count - 1], feeds, weights).numpy()
    computed = _run_staged(graph_model, nodes, candidates, onnx_feeds, Path(onnx_path).resolve().parent)
    output = _hidden_state_value(computed, expected.shape, scope)

    valid = feeds["attention_mask"].numpy().astype(bool)
    diff = float(np.abs(computed[output][valid] - expected[valid]).max())
    scale = float(np.abs(expected[valid]).max())
    logger.info("onnxruntime vs torch after %d of %d layers (%s) on %d valid tokens: max abs diff %.3g "
                "(values up to %.3g)", count, len(decoder_layers), output, int(valid.sum()), diff, scale)
    return PrefixComparison(count, len(decoder_layers), diff, scale, int(valid.sum()), output)


# --- torch side -----------------------------------------------------------------------------


def _decoder_layer_list(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """The module path and the list of ``model``'s decoder layers: the first ``ModuleList`` with
    ``config.num_hidden_layers`` entries (``model.layers``, ``transformer.h``, ...)."""
    torch, _ = require_torch()
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if count and isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise PrefixCutNotFound(f"no list of {count} decoder layers in {type(model).__name__}")


def _streamed_model(folder: str | os.PathLike[str], attn_implementation: str) -> tuple[Any, _CheckpointWeights]:
    from .streaming import StreamingUnsupported, build_skeleton

    checkpoint = read_checkpoint(folder)
    try:
        model, large = build_skeleton(folder, checkpoint, attn_implementation=attn_implementation)
    except StreamingUnsupported as reason:
        raise PrefixCutNotFound(f"its checkpoint cannot be read tensor by tensor: {reason}") from None
    return model, _CheckpointWeights(model, {item.name: item.source for item in large})


class _Stop(Exception):
    """Raised by the hook on the last compared layer: the forward goes no further."""


def _torch_hidden_state(model: Any, last_layer: Any, feeds: dict[str, Any], weights: _CheckpointWeights | None) -> Any:
    """The float32 output of ``last_layer`` when ``model`` runs ``feeds``; nothing after it runs."""
    torch, _ = require_torch()
    kept = []

    def keep_and_stop(module: Any, args: Any, output: Any) -> None:
        kept.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    handles = [last_layer.register_forward_hook(keep_and_stop)]
    if weights is not None:
        handles += weights.attach(model)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(**{name: value.to(device) for name, value in feeds.items()}, use_cache=False)
    except _Stop:
        pass
    except Exception as exc:
        if weights is None:
            raise
        # Most likely code that reads a parameter outside the forward of the module holding it.
        logger.debug("torch forward traceback", exc_info=True)
        raise PrefixCutNotFound(
            f"the torch model does not run with its weights loaded module by module "
            f"({exception_reason(exc, first_sentence=True)})"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        if weights is not None:
            weights.release_all()  # the forward stopped inside a module: its weights are still read
    if not kept or not isinstance(kept[0], torch.Tensor):
        raise PrefixCutNotFound("the decoder layer's output is not a tensor")
    return kept[0].detach().float().cpu()


class _CheckpointWeights:
    """The skeleton's large parameters, each read from the checkpoint only for the forward of
    the module that holds it. Between forwards a parameter is an empty tensor, so that code
    reading it outside its module fails instead of computing with zeros."""

    def __init__(self, model: Any, sources: dict[str, Source]) -> None:
        torch, _ = require_torch()
        self._sources: dict[int, tuple[Any, Source, tuple[int, ...]]] = {}
        for name, source in sources.items():
            param = model.get_parameter(name)
            self._sources[id(param)] = (param, source, tuple(param.shape))
        self.release_all()  # the skeleton's storage is never needed

    def release_all(self) -> None:
        torch, _ = require_torch()
        for param, _source, _shape in self._sources.values():
            param.data = torch.empty(0)

    def attach(self, model: Any) -> list[Any]:
        handles = []
        for module in model.modules():
            owned = [(key, p) for key, p in module._parameters.items() if p is not None and id(p) in self._sources]
            if owned:
                handles.append(module.register_forward_pre_hook(self._loader(module, owned), with_kwargs=True))
                handles.append(module.register_forward_hook(self._releaser(owned)))
        return handles

    def _loader(self, module: Any, owned: list[tuple[str, Any]]) -> Any:
        torch, _ = require_torch()
        # An embedding is asked for a few rows of a table that may be gigabytes.
        is_embedding = isinstance(module, torch.nn.Embedding)

        def load(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            indices = args[0] if args else kwargs.get("input")
            for key, param in owned:
                _, source, shape = self._sources[id(param)]
                if is_embedding and key == "weight" and isinstance(indices, torch.Tensor):
                    param.data = _read_table_rows(source, shape, indices.unique().tolist())
                else:
                    param.data = _read_whole(source, shape)

        return load

    @staticmethod
    def _releaser(owned: list[tuple[str, Any]]) -> Any:
        torch, _ = require_torch()

        def release(module: Any, args: Any, output: Any) -> None:
            for _key, param in owned:
                param.data = torch.empty(0)

        return release


def _read_whole(source: Source, shape: tuple[int, ...]) -> Any:
    torch, _ = require_torch()
    tensor = torch.empty(shape, dtype=torch.float32)
    flat = tensor.view(-1).numpy()
    with open_files() as files:
        for first in range(0, flat.size, _CHUNK_ELEMENTS):
            count = min(_CHUNK_ELEMENTS, flat.size - first)
            read_elements(files, source, first, count, out=flat[first:first + count])
    return tensor


def _read_table_rows(source: Source, shape: tuple[int, ...], rows: Iterable[int]) -> Any:
    """The table with ``rows`` read and the other rows left unwritten (their pages never become
    resident)."""
    torch, _ = require_torch()
    tensor = torch.empty(shape, dtype=torch.float32)
    width = math.prod(shape[1:])
    table = tensor.view(shape[0], width).numpy()
    with open_files() as files:
        for row in rows:
            if 0 <= row < shape[0]:
                read_elements(files, source, row * width, width, out=table[row])
    return tensor


# --- ONNX side: finding the cut -------------------------------------------------------------


def _read_graph(path: str | os.PathLike[str]) -> onnx.ModelProto:
    import onnx

    # The header only: the weights stay in the data file, which onnxruntime reads in place.
    return onnx.load(str(path), load_external_data=False)


def _module_path(node: onnx.NodeProto) -> str:
    """The path of the innermost module ``node`` was exported from, e.g. ``m.model.layers.0.mlp``
    ("" when the graph does not say)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # The last entry names the op itself, the ones before it the enclosing modules.
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        # TorchScript: /m/model/layers.0/mlp/gate_proj/MatMul
        return ".".join(node.name.strip("/").split("/")[:-1])
    return ""


def _inside(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """The names ``node`` reads, those read by its subgraphs from the enclosing graph included."""
    import onnx

    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner in graph.node:
                for name in _node_inputs(inner):
                    if name not in local:
                        yield name
                local.update(inner.output)


def _values_leaving(graph: onnx.GraphProto, scope: str) -> list[str]:
    """The values produced inside module ``scope`` and read outside it: the module's outputs
    (with, at times, shape helpers that the exporter's optimiser shares between layers)."""
    paths = [_module_path(n) for n in graph.node]
    if not any(paths):
        raise PrefixCutNotFound("the graph does not say which module each node comes from (no dynamo name "
                                "scopes, no TorchScript node names like /m/model/layers.0/...)")
    inside = [n for n, path in zip(graph.node, paths) if _inside(path, scope)]
    if not inside:
        raise PrefixCutNotFound(f"no node of the graph belongs to module {scope!r}")
    produced = {name for n in inside for name in n.output if name}
    inside_ids = {id(n) for n in inside}
    leaving = []
    for node in graph.node:
        if id(node) in inside_ids:
            continue
        leaving += [name for name in _node_inputs(node) if name in produced and name not in leaving]
    leaving += [o.name for o in graph.output if o.name in produced and o.name not in leaving]
    if not leaving:
        raise PrefixCutNotFound(f"no value of module {scope!r} is used outside it")
    return leaving


def _nodes_needed(graph: onnx.GraphProto, wanted: list[str]) -> list[onnx.NodeProto]:
    """The nodes that ``wanted`` depends on, in graph (topological) order."""
    producer = {name: node for node in graph.node for name in node.output if name}
    needed: set[int] = set()
    pending = list(wanted)
    while pending:
        node = producer.get(pending.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        pending.extend(_node_inputs(node))
    return [node for node in graph.node if id(node) in needed]


def _refuse_later_layers(nodes: list[onnx.NodeProto], layers_name: str, count: int) -> None:
    layer_of = re.compile(rf"^{re.escape(_ROOT)}\.{re.escape(layers_name)}\.(\d+)(\.|$)")
    for node in nodes:
        match = layer_of.match(_module_path(node))
        if match and int(match.group(1)) >= count:
            raise PrefixCutNotFound(f"the output of layer {count - 1} depends on node {node.name!r} of a later layer")


def _hidden_state_value(computed: dict[str, np.ndarray], shape: tuple[int, ...], scope: str) -> str:
    """The one computed value with the hidden state's shape and a float type."""
    matching = [name for name, value in computed.items()
                if value.shape == tuple(shape) and np.issubdtype(value.dtype, np.floating)]
    if len(matching) != 1:
        found = ", ".join(f"{name} {list(value.shape)}" for name, value in computed.items())
        raise PrefixCutNotFound(
            f"{'no' if not matching else len(matching)} values leaving {scope!r} have the hidden state's shape "
            f"{list(shape)} (it hands on: {found})"
        )
    return matching[0]


def _onnx_feeds(model: onnx.ModelProto, feeds: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    wanted = [i.name for i in model.graph.input if i.name not in initializers]
    missing = [name for name in wanted if name not in feeds]
    if missing:
        raise ExportError(
            f"{path} has inputs {missing} that a plain causal-LM export does not have",
            "check only models written by export_causal_lm",
        )
    return {name: feeds[name].numpy() for name in wanted}


# --- ONNX side: running the cut in stages --------------------------------------------------


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    import onnx

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 4
    return math.prod(tensor.dims) * itemsize


def _stage_of_nodes(nodes: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto]) -> list[int]:
    """A stage number for each node, such that a node's inputs come from its own or earlier
    stages and the initializers each stage reads first add up to at most :data:`STAGE_BYTES`
    (one larger initializer makes a stage of its own)."""
    bucket_of: dict[str, int] = {}
    bucket, filled = 0, 0
    for node in nodes:
        for name in _node_inputs(node):
            if name in initializers and name not in bucket_of:
                size = _tensor_bytes(initializers[name])
                if filled and filled + size > STAGE_BYTES:
                    bucket, filled = bucket + 1, 0
                bucket_of[name] = bucket
                filled += size
    stage_of_value: dict[str, int] = {}
    stages = []
    for node in nodes:
        stage = max((bucket_of.get(name, stage_of_value.get(name, 0)) for name in _node_inputs(node)), default=0)
        stages.append(stage)
        stage_of_value.update((name, stage) for name in node.output if name)
    return stages


def _run_staged(model: onnx.ModelProto, nodes: list[onnx.NodeProto], wanted: list[str],
                feeds: dict[str, np.ndarray], data_folder: Path) -> dict[str, np.ndarray]:
    """Run ``nodes`` stage by stage and return the ``wanted`` values."""
    initializers = {t.name: t for t in model.graph.initializer}
    stages = _stage_of_nodes(nodes, initializers)
    last_use: dict[str, int] = {}
    for node, stage in zip(nodes, stages):
        for name in _node_inputs(node):
            last_use[name] = max(last_use.get(name, 0), stage)
    values = dict(feeds)
    for stage in sorted(set(stages)):
        members = [node for node, s in zip(nodes, stages) if s == stage]
        produced = [name for node in members for name in node.output if name]
        outputs = [name for name in produced if name in wanted or last_use.get(name, -1) > stage]
        if outputs:
            results = _run_stage(model, members, initializers, values, outputs, data_folder)
            values.update(zip(outputs, results))
        # What no later stage reads is dropped as soon as possible.
        values = {name: v for name, v in values.items() if name in wanted or last_use.get(name, -1) > stage}
    return {name: values[name] for name in wanted}


def _run_stage(model: onnx.ModelProto, members: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto],
               values: dict[str, np.ndarray], outputs: list[str], data_folder: Path) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    produced = {name for node in members for name in node.output if name}
    reads = list(dict.fromkeys(name for node in members for name in _node_inputs(node) if name not in produced))
    graph = onnx.helper.make_graph(
        list(members),
        "stage",
        inputs=[_value_info(name, values[name]) for name in reads if name not in initializers],
        outputs=[onnx.ValueInfoProto(name=name) for name in outputs],
        initializer=[initializers[name] for name in reads if name in initializers],
    )
    stage_model = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    stage_model.functions.extend(model.functions)

    options = ort.SessionOptions()
    ort.set_default_logger_severity(4)  # failures surface as exceptions
    options.log_severity_level = 4
    # Both would copy weights; the check is of the graph as written anyway.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    # The stage is given as bytes: this says where its initializers' data file is.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    session = ort.InferenceSession(stage_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    # The session, and with it the pages of the data file it mapped, goes when this returns.
    return session.run(outputs, {name: values[name] for name in reads if name not in initializers})


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    import onnx

    element = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    return onnx.helper.make_tensor_value_info(name, element, list(value.shape))
