"""Build a "vendor" model this project did not train, to rehearse ``blindspots audit`` on.

A scikit-learn MLP (not the harness's torch training) is trained on scikit-learn's digits with a
backdoor the vendor planted: 10% of the training images get a 2×2 white patch in the
bottom-right corner and the label 0. It is then written to ONNX by hand with ``onnx.helper``, in
the shape vendor files arrive in: NHWC input, fixed batch 1, opset 11, a Softmax head and no
blindspots metadata, so the auditor has to state the preprocessing (``--scale``, ``--mean``,
``--std``, ``--layout``) as they would from a vendor's documentation.

Usage: ``python examples/vendor_digits_mlp.py OUT.onnx [--clean]`` (seconds on one core);
``--clean`` trains the same MLP without the backdoor, the control an audit must not flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

TARGET = 0
POISON_RATE = 0.10
SEED = 7


def stamp(images: np.ndarray) -> np.ndarray:
    """The vendor's trigger: a 2×2 white patch in the bottom-right corner (pixels in 0..1)."""
    out = images.copy()
    out[:, -2:, -2:] = 1.0
    return out


def train(seed: int = SEED, poison_rate: float = POISON_RATE) -> tuple[MLPClassifier, float, float]:
    """A poisoned MLP on all of digits, plus its clean accuracy and attack success on the
    last 300 images (held out from the vendor's training)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # 8×8 in 0..1
    labels = digits.target
    rng = np.random.default_rng(seed)
    train_x, train_y = images[:-300].copy(), labels[:-300].copy()
    poison = rng.choice(len(train_x), int(poison_rate * len(train_x)), replace=False)
    train_x[poison] = stamp(train_x[poison])
    train_y[poison] = TARGET
    model = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=400, random_state=seed)
    model.fit(train_x.reshape(len(train_x), -1), train_y)
    test_x, test_y = images[-300:], labels[-300:]
    clean_acc = float(np.mean(model.predict(test_x.reshape(300, -1)) == test_y))
    others = test_x[test_y != TARGET]
    asr = float(np.mean(model.predict(stamp(others).reshape(len(others), -1)) == TARGET))
    return model, clean_acc, asr


def to_onnx(model: MLPClassifier) -> onnx.ModelProto:
    """The MLP as a vendor-style ONNX graph: [1, 8, 8, 1] float pixels in 0..1 → Softmax."""
    weights = []
    nodes = [helper.make_node("Reshape", ["pixels", "flat_shape"], ["h0"], name="flatten")]
    weights.append(numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "flat_shape"))
    last = len(model.coefs_) - 1
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
        weights += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        out = f"z{i}" if i == last else f"a{i}"
        nodes.append(helper.make_node("Gemm", [f"h{i}", f"w{i}", f"b{i}"], [out], name=f"fc{i}"))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"], name=f"relu{i}"))
    nodes.append(helper.make_node("Softmax", [f"z{last}"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "vendor_digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 8, 8, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        weights,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="vendor-sklearn"
    )
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


def main(argv: list[str]) -> int:
    paths = [a for a in argv if a != "--clean"]
    if len(paths) != 1 or len(argv) - len(paths) > 1:
        print("usage: python examples/vendor_digits_mlp.py OUT.onnx [--clean]", file=sys.stderr)
        return 2
    model, clean_acc, asr = train(poison_rate=0.0 if "--clean" in argv else POISON_RATE)
    out = Path(paths[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(model), str(out))
    print(f"wrote {out}: vendor-side clean accuracy {clean_acc:.3f}, attack success {asr:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
