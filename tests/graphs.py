"""Small hand-built models for the pass and I/O tests, and an onnxruntime runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper


def parse(text: str, initializers: dict[str, np.ndarray] | None = None, check: bool = True) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    if check:
        onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run(path_or_model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# y = (x @ w1) @ w2 with 64×64 weights: large enough for external data, small to run.
TWO_MATMULS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 64] x) => (float[2, 64] y) {
    t = MatMul(x, w1)
    y = MatMul(t, w2)
}
"""


def mlp_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[batch, seq, 4] → Reshape via shape arithmetic → MatMul w → Relu → y[batch, seq, 2].

    Carries a dead node, an Identity on the weight, an unused input and initializer, and a
    duplicated weight, so every cleanup rule and the shape folding have something to do.
    Returns the model and the weights, for computing the expected output independently.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 2)).astype(np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    mlp (float[batch, seq, 4] x, float[batch, 3] unused) => (float[batch, seq, 2] y) {
        s = Shape(x)
        two = Constant<value = int64[1] {2}>()
        d = Gather<axis=0>(s, two)
        m1 = Constant<value = int64[1] {-1}>()
        flat_shape = Concat<axis=0>(m1, d)
        flat = Reshape(x, flat_shape)
        w_id = Identity(w)
        a = MatMul(flat, w_id)
        b = MatMul(flat, w_dup)
        ab = Add(a, b)
        r = Relu(ab)
        lead = Shape<end=2>(x)
        half = Constant<value = int64[1] {2}>()
        out_last = Div(d, half)
        out_shape = Concat<axis=0>(lead, out_last)
        y = Reshape(r, out_shape)
        dead = Add(x, x)
        dead2 = Mul(dead, dead)
    }
    """
    model = parse(text, {"w": w, "w_dup": w.copy(), "junk": np.ones(3, np.float32)})
    return model, {"w": w}


def mlp_expected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The mlp_model's output computed with numpy alone."""
    flat = x.reshape(-1, 4)
    return np.maximum(flat @ w + flat @ w, 0).reshape(x.shape[0], x.shape[1], 2)


def set_external_location(path: Path, location: str) -> None:
    """Point every external tensor of a saved model at ``location`` (to build unsafe inputs)."""
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


def data_file(model_path: Path) -> Path:
    """The one external-data file ``model_path`` refers to, read from its protobuf (each save
    gives it a name of its own, so tests look it up rather than guess it)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(locations) == 1, locations
    return Path(model_path).parent / locations.pop()
