"""Streaming a checkpoint that transformers converts while loading: Mixtral's per-expert tensors.

The checkpoint holds ``block_sparse_moe.experts.<e>.w1/w2/w3.weight``; the model has
``mlp.experts.gate_up_proj`` (w1 and w3 of each expert, stacked) and ``mlp.experts.down_proj``.
The streamed export must be the in-memory one, bytes and all; layouts it cannot reproduce must
fall back, and pieces that do not fit must be refused.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from qeff.frontend import build_tiny_model, export_causal_lm, load_causal_lm  # noqa: E402
from qeff.frontend import streaming, streaming_sources  # noqa: E402
from qeff.frontend.randomize import randomize_parameters  # noqa: E402
from qeff.frontend.safetensors_index import read_checkpoint  # noqa: E402
from qeff.frontend.streaming import StreamedTensor, StreamingUnsupported, _Layout, export_folder_streaming  # noqa: E402
from qeff.frontend.streaming_sources import FusedTensor, checkpoint_sources, open_files, read_elements  # noqa: E402
from qeff.frontend.tiny import tiny_config  # noqa: E402
from tests.frontend.test_streaming_export import _assert_same_export, _refused, _save  # noqa: E402

EXPERTS = "model.layers.1.block_sparse_moe.experts"


def _mixtral(layers):
    """Mixtral at hidden size 128, as ``_model`` in test_streaming_export, so that the experts are
    streamed; one layer keeps the dynamo exports short (the mapping of several layers is checked
    without exporting, below)."""
    config = tiny_config("mixtral")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 256, layers
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return randomize_parameters(model, 5).eval()


def _skeleton_sources(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    return checkpoint_sources(meta, read_checkpoint(folder))


def _read_whole(source):
    with open_files() as files:
        return read_elements(files, source, 0, int(np.prod(source.shape))).reshape(source.shape)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny two-layer Mixtral, sharded in bfloat16 so that experts spread over several files."""
    return _save(build_tiny_model("mixtral", seed=3), tmp_path_factory.mktemp("tiny") / "hf", "bfloat16", shards=True)


def test_every_parameter_has_what_from_pretrained_loads(tiny_checkpoint):
    sources = _skeleton_sources(tiny_checkpoint)
    assert not sources.unused and sources.failure is None
    loaded = load_causal_lm(tiny_checkpoint)
    assert sources.by_name.keys() == loaded.state_dict().keys()
    for name, param in loaded.state_dict().items():
        source = sources.by_name[name]
        assert isinstance(source, FusedTensor) == ("experts" in name), name
        np.testing.assert_array_equal(_read_whole(source), param.numpy(), err_msg=name)
    gate_up = sources.by_name["model.layers.1.mlp.experts.gate_up_proj"]
    # Stacked over experts, then w1 before w3 along axis 1: each piece is one run.
    assert [t.name.removeprefix(EXPERTS + ".") for t in gate_up.pieces] == [
        f"{e}.{w}.weight" for w in ("w1", "w3") for e in range(4)
    ]
    assert [(r.tensor.name.removeprefix(EXPERTS + "."), r.start) for r in gate_up.runs[:3]] == [
        ("0.w1.weight", 0), ("0.w3.weight", 128 * 64), ("1.w1.weight", 2 * 128 * 64)
    ]
    assert len({t.path for t in gate_up.pieces}) > 1


def test_a_fused_parameter_is_read_in_chunks_in_any_axis_order(tiny_checkpoint, monkeypatch):
    # The optimiser may fold a Transpose of a fused parameter into a permuted initializer.
    name = "model.layers.0.mlp.experts.gate_up_proj"
    source = _skeleton_sources(tiny_checkpoint).by_name[name]
    expected = load_causal_lm(tiny_checkpoint).state_dict()[name].numpy()
    reads = []
    real_read = streaming_sources.read_into

    def counting_read(fd, tensor, first, out):
        reads.append(out.size)
        real_read(fd, tensor, first, out)

    monkeypatch.setattr(streaming_sources, "read_into", counting_read)
    for chunk, perm in itertools.product((700, 5000), itertools.permutations(range(3))):
        monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", chunk)
        reads.clear()
        layout = _Layout(tuple(expected.shape[p] for p in perm), squeezed=expected.shape, perm=perm)
        np.testing.assert_array_equal(StreamedTensor(source, layout).numpy(), expected.transpose(perm))
        assert reads and max(reads) <= chunk, (chunk, perm)
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 3000)
    part = _Layout((2, 256, 64), offset=2 * 256 * 64)  # experts 2 and 3, read across pieces
    np.testing.assert_array_equal(StreamedTensor(source, part).numpy(), expected[2:])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same weights as a bfloat16 sharded checkpoint and a float32 single file (the float32
    values are bfloat16 ones, so both load to the same model and one in-memory export is the
    reference of both)."""
    root = tmp_path_factory.mktemp("mixtral")
    model = _mixtral(layers=1).to(torch.bfloat16).to(torch.float32)
    return {"bfloat16-sharded": _save(model, root / "bf16", "bfloat16", shards=True),
            "float32-single": _save(model, root / "fp32", "float32")}


@pytest.fixture(scope="module")
def dynamo_reference(checkpoints, tmp_path_factory):
    models = [load_causal_lm(folder) for folder in checkpoints.values()]
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name
    return export_causal_lm(models[0], tmp_path_factory.mktemp("reference") / "m.onnx", external_data=True,
                            progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bfloat16-sharded", "float32-single"])
def test_streamed_mixtral_is_the_in_memory_export(checkpoints, dynamo_reference, tmp_path, monkeypatch, layout):
    folder = checkpoints[layout]
    assert (folder / "model.safetensors.index.json").is_file() == (layout == "bfloat16-sharded")
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 1000)  # chunks straddle the experts' pieces
    result = export_folder_streaming(folder, tmp_path / "streamed" / "m.onnx", progress=False)
    assert result.architecture == "mixtral"
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["m.onnx", "m.onnx.data"]
    _assert_same_export(result.path, dynamo_reference)


@pytest.mark.slow
def test_streamed_mixtral_with_torchscript_is_its_in_memory_export(tmp_path, monkeypatch):
    folder = _save(_mixtral(layers=2), tmp_path / "hf", "bfloat16", shards=True)
    reference = export_causal_lm(load_causal_lm(folder), tmp_path / "memory" / "m.onnx", exporter="torchscript",
                                 external_data=True, progress=False)
    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 1000)
    result = export_folder_streaming(folder, tmp_path / "streamed" / "m.onnx", exporter="torchscript", progress=False)
    _assert_same_export(result.path, reference)


@pytest.fixture
def weights(tmp_path):
    from safetensors.torch import load_file

    folder = _save(build_tiny_model("mixtral", seed=1), tmp_path / "hf")
    return folder, load_file(folder / "model.safetensors")


def _rewrite(folder, weights):
    from safetensors.torch import save_file

    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_pieces_that_do_not_fit_are_refused(tmp_path, weights):
    folder, original = weights
    changed = dict(original, **{f"{EXPERTS}.2.w3.weight": torch.zeros(64, 64)})
    _rewrite(folder, changed)
    _refused(folder, tmp_path / "out", rf"tensor '{EXPERTS}.2.w3.weight' \(shape \[64, 64\] in model.safetensors\) "
                                       r"cannot be joined with tensor '.*experts.0.w3.weight'")

    changed = dict(original)
    del changed[f"{EXPERTS}.3.w2.weight"]
    _rewrite(folder, changed)
    _refused(folder, tmp_path / "out", r"the 3 tensors joined into 'model.layers.1.mlp.experts.down_proj' "
                                       r".* make shape \[3, 64, 128\], the model expects \[4, 64, 128\]")

    changed = dict(original, **{f"{EXPERTS}.0.w1.weight": original[f"{EXPERTS}.0.w1.weight"].to(torch.int32)})
    _rewrite(folder, changed)
    _refused(folder, tmp_path / "out", f"'{EXPERTS}.0.w1.weight' is I32")


def test_a_conversion_that_is_not_a_join_is_not_streamed(tmp_path, weights, monkeypatch):
    from transformers import conversion_mapping, core_model_loading

    folder, _ = weights
    real_mapping = conversion_mapping.get_model_conversion_mapping

    def with_a_transpose(model, *args, **kwargs):
        transforms = real_mapping(model, *args, **kwargs)
        # The list is transformers' copy: changing it changes nothing outside this call.
        for transform in transforms:
            if isinstance(transform, core_model_loading.WeightConverter) and "down_proj" in str(transform):
                transform.operations.append(core_model_loading.Transpose(dim0=1, dim1=2))
        return transforms

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", with_a_transpose)
    with pytest.raises(StreamingUnsupported, match=r"experts.down_proj' in pieces .* Transpose, which is not streamed"):
        export_folder_streaming(folder, tmp_path / "out" / "m.onnx", progress=False)
    assert not (tmp_path / "out").exists()
