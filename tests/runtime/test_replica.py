"""The gradient oracle: a torch replica of the deployed ONNX graph must reproduce onnxruntime's
logits (every precision) and give correct / usable gradients, or refuse the graph clearly."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.core.errors import ModelError
from harness.replica.interpreter import build_replica
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.oracle import GradientOracle
from harness.training.models import build_model
from tests.conftest import PRECISIONS


def _pixel_grad(oracle: GradientOracle, pixels: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    p = pixels.clone().requires_grad_(True)
    (oracle.logits(p) * weights).sum().backward()
    return p.grad.numpy().ravel()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_replica_matches_onnxruntime_on_every_precision(digits_world, precision):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned[precision])
    report = adapter.gradient_oracle().parity(digits_world.x_test, stamped=digits_world.triggered_x)
    print(f"{precision}: {report}")
    assert [s.name for s in report.sets] == ["clean", "stamped"]
    assert report.n == len(digits_world.x_test) + len(digits_world.triggered_x)
    assert report.passed and report.agreement >= 0.995, report.failures
    if precision == "fp32":
        assert report.max_abs_logit_diff < 1e-4
    else:  # rare off-by-one-quantum roundings only, never a systematic offset
        assert report.mean_abs_logit_diff < 1e-2


def test_parity_flags_a_replica_of_another_model(digits_world):
    """The parity gate compares against the adapter's own session and fails on disagreement."""
    oracle = GradientOracle(RuntimeAdapter.from_path(digits_world.clean["fp32"]))
    oracle.adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    report = oracle.parity(digits_world.triggered_x)
    assert not report.passed and report.agreement < 0.9


def test_fp32_gradient_matches_central_finite_differences(digits_world):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    rng = np.random.default_rng(0)
    # noise breaks the exact ties (flat background) where max-pool / ReLU are not differentiable
    base = digits_world.x_test[:2].astype(np.float64) + rng.uniform(0.2, 0.8, (2, 8, 8, 1))
    weights64 = torch.from_numpy(rng.normal(size=(2, 10)))
    oracle64 = GradientOracle(adapter)
    oracle64.module.double()

    def objective(p: np.ndarray) -> float:
        with torch.no_grad():
            return float((oracle64.logits(torch.from_numpy(p)) * weights64).sum())

    grad = _pixel_grad(oracle64, torch.from_numpy(base), weights64)
    eps = 1e-3
    for index in rng.choice(base.size, size=8, replace=False):
        step = np.zeros(base.size)
        step[index] = eps
        step = step.reshape(base.shape)
        numeric = (objective(base + step) - objective(base - step)) / (2 * eps)
        assert numeric == pytest.approx(grad[index], rel=1e-4, abs=1e-9)
    # the float32 replica (what defenses use) gives the same gradient up to float32 rounding
    grad32 = _pixel_grad(
        adapter.gradient_oracle(), torch.from_numpy(base.astype(np.float32)), weights64.float()
    )
    np.testing.assert_allclose(grad32, grad, rtol=1e-3, atol=1e-3 * np.abs(grad).max())


def test_quantized_gradients_flow_through_the_straight_through_estimator(digits_world):
    pixels = torch.from_numpy(digits_world.x_test[:16].astype(np.float32))
    weights = torch.from_numpy(np.random.default_rng(1).normal(size=(16, 10)).astype(np.float32))
    reference = _pixel_grad(
        RuntimeAdapter.from_path(digits_world.poisoned["fp32"]).gradient_oracle(), pixels, weights
    )
    for precision in ("int8-dynamic", "int8-static", "int4"):
        oracle = RuntimeAdapter.from_path(digits_world.poisoned[precision]).gradient_oracle()
        grad = _pixel_grad(oracle, pixels, weights)
        assert np.isfinite(grad).all(), precision
        assert np.mean(grad != 0) > 0.5, precision
        cosine = grad @ reference / (np.linalg.norm(grad) * np.linalg.norm(reference))
        assert cosine > 0.8, f"{precision}: STE gradient far from the float gradient ({cosine:.3f})"


def test_dynamic_quantization_statistics_per_sample_or_per_batch(digits_world):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["int8-dynamic"])
    images = digits_world.x_test[:32]
    pixels = torch.from_numpy(images.astype(np.float32))
    with torch.no_grad():
        per_sample = GradientOracle(adapter).logits(pixels).numpy()
        batched = GradientOracle(adapter, dynamic_per_sample=False).logits(pixels).numpy()
    ort_single = adapter.logits(images, per_sample=True)
    ort_batch = adapter.logits(images, per_sample=False)
    assert np.abs(ort_single - ort_batch).max() > 1e-3  # batch-mates really change the scales
    np.testing.assert_allclose(per_sample, ort_single, atol=1e-4)
    np.testing.assert_allclose(batched, ort_batch, atol=1e-4)


def _qdq_graph(scale: float, zero_point: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("zp", TensorProto.UINT8, [], [zero_point]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_quantize_rounds_half_to_even_and_gradient_stops_outside_the_range():
    model = _qdq_graph(0.5, 10)
    values = np.array([[1.25, 1.75, -1.25, 0.3, 200.0, -100.0]], dtype=np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": values})[0]
    x = torch.from_numpy(values).requires_grad_(True)
    y = build_replica(model)(x)
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    assert y.detach().numpy()[0, :3].tolist() == [1.0, 2.0, -1.0]  # 2.5→2, 3.5→4, -2.5→-2
    y.sum().backward()
    assert x.grad.numpy().tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("op", "domain", "shown"),
    [
        ("Einsum", "", "'Einsum'"),
        ("QAttention", "com.microsoft", "'com.microsoft.QAttention'"),
    ],
)
def test_unsupported_op_is_refused_at_build_time(op, domain, shown):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node(op, ["x"], ["y"], name="odd_node", domain=domain)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(ModelError, match=f"unsupported ONNX op {shown} \\(node odd_node\\)"):
        build_replica(model)


def test_unsupported_attribute_is_refused_at_build_time():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(ModelError, match=r"MaxPool.*Indices"):
        build_replica(model)


def _export(name: str | torch.nn.Module, size: int, path, pp: Preprocessing) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 3) if isinstance(name, str) else name
    for module in model.modules():  # non-trivial BN statistics, so folding them is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            opset_version=21,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=METADATA_KEY, value=pp.to_json())
    onnx.save(proto, str(path))


def _assert_close_to_ort(path, images: np.ndarray, rel: float) -> None:
    adapter = RuntimeAdapter.from_path(path)
    reference = adapter.logits(images)
    report = adapter.gradient_oracle().parity(images)
    spread = float(reference.max() - reference.min())
    print(f"{path.name}: {report} (logit spread {spread:.3g})")
    # The exact INT8 kernel profile (the adapter's default) computes the same numbers on every
    # x86 CPU, so the full gate holds everywhere: no allowance for "other CPUs" is needed.
    assert report.passed, report.failures
    assert report.max_abs_logit_diff <= rel * spread


def test_cifar_cnn_fp32_and_qdq_int8_match_onnxruntime(tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    pp = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    fp32, int8 = tmp_path / "cifar.onnx", tmp_path / "cifar-int8.onnx"
    _export("cifar_cnn", 32, fp32, pp)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": pp.apply(images[i : i + 8])} for i in (0, 8)])

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice
    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    _assert_close_to_ort(fp32, images[16:], rel=1e-4)
    _assert_close_to_ort(int8, images[16:], rel=0.05)


def test_resnet18_with_residual_adds_matches_onnxruntime(tmp_path):
    pp = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path = tmp_path / "resnet18.onnx"
    _export("resnet18", 16, path, pp)
    assert sum(n.op_type == "Add" for n in onnx.load(str(path)).graph.node) >= 8
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    _assert_close_to_ort(path, images, rel=1e-4)


def test_pixels_with_the_wrong_layout_are_refused(digits_world):
    oracle = RuntimeAdapter.from_path(digits_world.poisoned["fp32"]).gradient_oracle()
    with pytest.raises(ModelError, match="NHWC pixels with 1 channel"):
        oracle.logits(torch.zeros(2, 1, 8, 8))


class _OpZoo(torch.nn.Module):
    """Exercises the less common converters torch exports produce (Slice, Shape/Gather/Unsqueeze
    /Concat/Reshape, BatchNormalization, LeakyRelu, Clip, AveragePool with ceil mode,
    GlobalMaxPool, ReduceMean, Transpose, Softmax, grouped Conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(16, 8, 1, groups=2)
        self.fc = torch.nn.Linear(8 * 3 * 3 + 8, 10)

    def forward(self, x):
        fn = torch.nn.functional
        y = self.conv(x)
        y = fn.leaky_relu(self.bn(torch.sigmoid(y) * y), 0.1)
        y = torch.cat([y, torch.clamp(y, -0.5, 0.5)], dim=1)
        y = fn.avg_pool2d(self.conv2(y), 3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        g = fn.adaptive_max_pool2d(y, 1).flatten(1) - y.mean(dim=(2, 3))
        y = fn.max_pool2d(y, 2, 1, padding=1)[:, :, :3, :3]
        y = y.permute(0, 2, 3, 1).reshape(y.size(0), -1)
        return torch.softmax(self.fc(torch.cat([y, g], 1)), dim=-1) * 10


def test_op_zoo_fp32_and_dynamic_int8_match_onnxruntime(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    zoo = _OpZoo().eval()
    zoo.bn.running_mean.uniform_(-0.2, 0.2)
    pp = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    fp32, dyn = tmp_path / "zoo.onnx", tmp_path / "zoo-dyn.onnx"
    _export(zoo, 12, fp32, pp)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's chatter; restored so later tests see warnings
    try:
        quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    ops = {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert {"Slice", "Shape", "Gather", "DynamicQuantizeLinear", "ConvInteger"} <= ops
    images = np.random.default_rng(2).integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    _assert_close_to_ort(fp32, images, rel=1e-4)
    _assert_close_to_ort(dyn, images, rel=1e-4)  # per-sample scales via vmap, Shape ops inside


def test_explicit_and_automatic_padding_match_onnxruntime():
    """SAME_UPPER, asymmetric pads (conv, max and average pool), dilation: as ORT computes them."""
    rng = np.random.default_rng(0)
    weights = [
        onnx.numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.normal(size=(3, 4, 2, 2)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node(
            "AveragePool", ["c"], ["a"], kernel_shape=[3, 3], pads=[0, 1, 2, 0], count_include_pad=0
        ),
        helper.make_node(
            "MaxPool", ["a"], ["m"], kernel_shape=[2, 3], pads=[1, 0, 0, 2], strides=[1, 2]
        ),
        helper.make_node("Conv", ["m", "w2"], ["y"], pads=[0, 1, 1, 0], dilations=[2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "pads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, None, None])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.normal(size=(3, 2, 9, 7)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        ours = build_replica(model)(torch.from_numpy(x)).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_flatten_with_a_negative_axis_follows_the_onnx_spec():
    import torch
    from onnx import TensorProto

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Flatten", ["x"], ["y"], axis=-1)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    out = build_replica(model)(torch.zeros(2, 3, 4, 5))
    assert tuple(out.shape) == (24, 5)
