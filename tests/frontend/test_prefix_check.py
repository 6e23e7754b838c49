"""The prefix check: the exported graph cut after its first decoder layers, run under onnxruntime
on the written data file, against torch reading the same checkpoint module by module.

One generated Llama checkpoint of 0.45 GB (float32), most of it embedding and head, is exported
once by streaming. On it the check agrees with torch, reports a large difference when a weight
inside the cut is damaged in the data file, never reads what lies after the cut, and holds far
less than the model while it runs (measured in a child process). TorchScript exports of tiny
models of other families (hidden size 128, so that the torch side reads their matrices from the
checkpoint rather than the skeleton loading them) agree as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from qeff import cli  # noqa: E402
from qeff.errors import ExportError  # noqa: E402
from qeff.frontend import api  # noqa: E402
from qeff.frontend.api import export_model  # noqa: E402
from qeff.frontend.prefix_check import PrefixCutNotFound, compare_prefix  # noqa: E402
from tests.cli.test_cli import invoke  # noqa: E402
from tests.frontend.test_streaming_export import _model, _save  # noqa: E402

pytestmark = pytest.mark.slow

# A correct export differs from torch by float32 rounding only; a damaged weight by far more.
AGREES = 1e-4
DIFFERS = 1e-2

# The generated Llama: 0.43 GB in float32, 0.2 GB of it in the embedding and as much in the head.
VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 100_000, 512, 1024, 2


# --- the generated model ---------------------------------------------------------------------


def _write_llama_checkpoint(folder: Path, *, vocab: int, hidden: int, intermediate: int, layers: int) -> int:
    """A float16 Llama checkpoint written tensor by tensor (values: one random block repeated);
    returns the model's float32 size in bytes."""
    folder.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                 "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                 "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                 "mlp.down_proj": (hidden, intermediate)}
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    block = (np.random.default_rng(0).standard_normal(1 << 20, np.float32) * 0.05).astype(np.float16)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            (np.ones(shape, np.float16) if len(shape) == 1 else np.resize(block, shape)).tofile(f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return sum(math.prod(s) for s in shapes.values()) * 4


# Runs the prefix check in a child process and prints its resident memory before the check (the
# interpreter with torch, transformers and onnxruntime imported) and its peak at the end. The peak
# is the kernel's VmHWM of the child's own memory: its ru_maxrss would start from the RSS of this
# test process, which the kernel carries over when the child is forked and executes Python.
_MEASURE = """
import json, sys
import onnxruntime, torch, transformers
import transformers.models.llama.modeling_llama
from qeff.frontend.prefix_check import compare_prefix

def status(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))

before = status("VmRSS")
comparison = compare_prefix(sys.argv[1], folder=sys.argv[2], layers=2)
print(json.dumps({"before": before, "peak": status("VmHWM"), "diff": comparison.max_abs_diff}))
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The generated checkpoint, its float32 size, and its streamed export checked over one layer."""
    root = tmp_path_factory.mktemp("generated")
    folder = root / "hf"
    model_bytes = _write_llama_checkpoint(folder, vocab=VOCAB, hidden=HIDDEN, intermediate=INTERMEDIATE,
                                          layers=LAYERS)
    result = export_model(source=folder, output=root / "out" / "m.onnx", check="prefix", check_layers=1,
                          progress=False)
    return folder, model_bytes, result


# --- finding what to damage --------------------------------------------------------------------


def _weight_of(path: Path, module: str) -> onnx.TensorProto:
    """The external initializer read by the node exported from ``module`` (dynamo name scopes or
    TorchScript node names)."""
    from qeff.frontend.prefix_check import _module_path

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        if _module_path(node) == module:
            found = [initializers[name] for name in node.input if name in initializers]
            if found:
                return found[0]
    raise AssertionError(f"no node of {module} reads an external initializer")


def _flip_signs(path: Path, tensor: onnx.TensorProto) -> None:
    """Flip the sign bit of every float32 of ``tensor`` in the data file of ``path``: a damage
    without NaN or infinity, undone by flipping again."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(path.parent / info["location"], "r+b") as data:
        data.seek(offset)
        values = np.frombuffer(data.read(length), np.uint32) ^ np.uint32(0x80000000)
        data.seek(offset)
        data.write(values.tobytes())


@contextlib.contextmanager
def _damaged(path: Path, *modules: str) -> Iterator[None]:
    """The export at ``path`` with the weights of ``modules`` damaged, repaired afterwards (the
    other tests share it)."""
    tensors = [_weight_of(path, module) for module in modules]
    for tensor in tensors:
        _flip_signs(path, tensor)
    try:
        yield
    finally:
        for tensor in tensors:
            _flip_signs(path, tensor)


# --- agreement ---------------------------------------------------------------------------------


def test_export_model_runs_the_prefix_check(generated):
    _, _, result = generated
    assert (result.check, result.checked_layers) == ("prefix", 1)
    assert result.max_abs_diff is not None and result.max_abs_diff <= AGREES


def _torchscript_export(folder: Path, path: Path) -> Path:
    """The TorchScript exporter's graph of the model in ``folder``, called on the model itself, so
    that node names carry the module path (``/m/model/layers.0/...``)."""
    from qeff.frontend.export import _wrap, example_args, input_names_for
    from qeff.frontend.loading import load_causal_lm

    model = load_causal_lm(folder)
    names = input_names_for(model)
    axes = {name: {0: "batch", 1: "seq"} for name in [*names, "logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python-level shape arithmetic
        torch.onnx.export(_wrap(model).eval(), example_args(model, names), str(path), dynamo=False,
                          input_names=names, output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("arch", ["gpt2", "falcon", "gemma", "qwen2", "phi3", "mpt"])
def test_the_prefix_check_agrees_with_torch_on_torchscript_graphs(arch, tmp_path):
    folder = _save(_model(arch, seed=3), tmp_path / "hf")
    path = _torchscript_export(folder, tmp_path / "m.onnx")
    comparison = compare_prefix(path, folder=folder, layers=1)
    assert comparison.layers == 1 and comparison.total_layers == 2
    assert comparison.output.startswith("/m/")  # a TorchScript node's output, found by its name
    assert comparison.max_abs_diff <= AGREES


# --- damage --------------------------------------------------------------------------------------


def test_a_damaged_layer_0_weight_is_caught(generated):
    folder, _, result = generated
    with _damaged(result.path, "m.model.layers.0.mlp.down_proj"):
        assert compare_prefix(result.path, folder=folder, layers=1).max_abs_diff > DIFFERS
    assert compare_prefix(result.path, folder=folder, layers=1).max_abs_diff <= AGREES


def test_nothing_after_the_cut_is_read(generated):
    folder, _, result = generated
    with _damaged(result.path, "m.model.layers.1.self_attn.q_proj", "m.lm_head"):
        assert compare_prefix(result.path, folder=folder, layers=1).max_abs_diff <= AGREES
        # The damaged layer is seen once inside the cut; the head never is.
        assert compare_prefix(result.path, folder=folder, layers=2).max_abs_diff > DIFFERS


# --- choosing the check, and the cut that cannot be found ----------------------------------------


def test_auto_is_the_full_check_up_to_the_limit_and_the_prefix_check_above(generated, tmp_path, monkeypatch):
    small = export_model(tiny="llama", output=tmp_path / "small" / "m.onnx", exporter="torchscript", check=True,
                         progress=False)
    assert (small.check, small.checked_layers) == ("full", None) and small.max_abs_diff <= AGREES
    for unchecked in (False, "none"):
        result = export_model(tiny="llama", output=tmp_path / str(unchecked) / "m.onnx", exporter="torchscript",
                              check=unchecked, progress=False)
        assert (result.check, result.max_abs_diff) == (None, None)

    # Above the limit (lowered here, instead of exporting a model of more than 1 GiB again).
    folder, model_bytes, result = generated
    monkeypatch.setattr(api, "STREAMED_CHECK_MAX_BYTES", model_bytes - 1)
    ran, diff, layers = api._check("auto", result.path, model_bytes, model=None, source=folder, layers=1,
                                   attn_implementation="eager")
    assert (ran, layers) == ("prefix", 1) and diff <= AGREES


def test_a_bad_check_is_refused_before_the_export(tmp_path):
    with pytest.raises(ExportError, match="unknown check 'fast'"):
        export_model(tiny="llama", output=tmp_path / "m.onnx", check="fast", progress=False)
    with pytest.raises(ExportError, match="cannot check 0 layers"):
        export_model(tiny="llama", output=tmp_path / "m.onnx", check="prefix", check_layers=0, progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_a_graph_without_module_names_is_not_compared(generated, tmp_path, monkeypatch, caplog):
    folder, _, result = generated

    def anonymous(under: str) -> Path:
        """The export with the module names of the nodes under module ``under`` ("": all) dropped,
        saved beside it (the same data file, by the same location)."""
        from qeff.frontend.prefix_check import _module_path

        model = onnx.load(str(result.path), load_external_data=False)
        for node in model.graph.node:
            if _module_path(node).startswith(under):
                node.name = ""
                del node.metadata_props[:]
        path = result.path.parent / "anonymous.onnx"
        onnx.save(model, str(path))
        return path

    with pytest.raises(PrefixCutNotFound, match="does not say which module each node comes from"):
        compare_prefix(anonymous(""), folder=folder, layers=1)
    with pytest.raises(PrefixCutNotFound, match="no node of the graph belongs to module 'm.model.layers.0'"):
        compare_prefix(anonymous("m.model.layers.0"), folder=folder, layers=1)

    # export_model warns and reports no check instead of comparing the wrong tensors.
    def not_found(*args, **kwargs):
        raise PrefixCutNotFound("no node of the graph belongs to module 'm.model.layers.1'")

    monkeypatch.setattr(api, "compare_prefix", not_found)
    with caplog.at_level(logging.WARNING, logger="qeff.frontend.api"):
        unchecked = export_model(tiny="llama", output=tmp_path / "m.onnx", exporter="torchscript", check="prefix",
                                 progress=False)
    assert unchecked.check is None and unchecked.max_abs_diff is None
    assert any("cannot be checked alone" in r.getMessage() for r in caplog.records)


def test_the_command_line_chooses_the_check(tmp_path, monkeypatch, capsys):
    # A dynamo export of GPT-2: its layers are transformer.h, its weights Conv1D.
    out = tmp_path / "m.onnx"
    code, stdout, err = invoke(cli.main, ["export", "--tiny", "gpt2", "-o", out, "--check", "prefix",
                                          "--check-layers", "1"], monkeypatch, capsys)
    assert code == 0, err
    assert "after the first 1 decoder layers: max abs hidden-state difference" in " ".join(stdout.split())
    code, stdout, err = invoke(cli.main, ["export", "--tiny", "qwen2", "--exporter", "torchscript",
                                          "-o", tmp_path / "n.onnx", "--no-check"], monkeypatch, capsys)
    assert code == 0, err
    assert "onnxruntime vs torch" not in stdout
    code, _, err = invoke(cli.main, ["export", "--tiny", "qwen2", "-o", tmp_path / "o.onnx", "--check", "half"],
                          monkeypatch, capsys)
    assert code == 2 and "unknown check 'half'" in err


# --- memory ----------------------------------------------------------------------------------------


def test_the_prefix_check_holds_far_less_than_the_model(generated):
    # The full check holds the whole model twice (torch, and onnxruntime's mapped weights); a
    # check that read the embedding or the head whole would add at least that table. The prefix
    # check reads a few rows of the embedding and two small layers.
    folder, model_bytes, result = generated
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(result.path), str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["diff"] <= AGREES
    added = measured["peak"] - measured["before"]
    table = VOCAB * HIDDEN * 4
    assert added < table < model_bytes / 2, (
        f"the check added {added / 2**20:.0f} MiB; the embedding is {table / 2**20:.0f} MiB, "
        f"the model {model_bytes / 2**20:.0f} MiB"
    )
