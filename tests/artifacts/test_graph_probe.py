"""Probe points and channel masking on every graph form a vendor may ship.

Tiny float CNNs are built here with onnx.helper and quantized with onnxruntime itself, in QDQ,
QOperator (QLinearConv → QLinearAdd → QLinearGlobalAveragePool → QGemm) and dynamic
(ConvInteger → Cast → Mul → Add) form, with and without global pooling, with the bias inside
the Conv or as a separate ``Add``. Inputs lie on the uint8 grid and weights are exactly
representable in int8, so the only error left between a probe and the float activation is the
rounding of the re-quantizations on the path — the bounds below are exactly those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from harness.artifacts.graph_probe import (
    ProbePoint,
    add_probe_outputs,
    discover_layers,
    mask_channels,
)
from harness.runtime.kernels import session_options

CHANNELS = 4
FORMATS = ("fp32", "dynamic", "qoperator", "qdq")
BIASES = np.array([0.2, -0.2, 0.1, -0.1], np.float32)  # negative ones make the ReLU clip
KEEP = np.array([True, False, True, False])


def _pixels() -> np.ndarray:
    """Inputs on the uint8 grid (0 and 255 both present): quantized exactly with scale 1/255."""
    x = np.random.default_rng(1).integers(0, 256, (8, 1, 8, 8)).astype(np.float32)
    x[0, 0, 0, :2] = (0.0, 255.0)
    return x / np.float32(255.0)


def _float_cnn(pool: bool, bias_as_add: bool) -> onnx.ModelProto:
    """Conv(3×3) [+ separate bias Add] → ReLU → GlobalAveragePool + Flatten, or Reshape →
    FC → ReLU → FC."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (CHANNELS, 1, 3, 3))
    codes[:, 0, 0, 0] = 127  # every channel's max |w| is 127 codes: int8 weights are exact
    inits = [numpy_helper.from_array((codes * np.float32(2**-10)).astype(np.float32), "w")]
    if bias_as_add:
        inits.append(numpy_helper.from_array(BIASES.reshape(1, CHANNELS, 1, 1), "b"))
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["conv", "b"], ["biased"]),
        ]
    else:
        inits.append(numpy_helper.from_array(BIASES, "b"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["biased"], pads=[1, 1, 1, 1])]
    nodes.append(helper.make_node("Relu", ["biased"], ["act"]))
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["act"], ["gap"]))
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    else:  # the view(n, -1) of a torch export: a Reshape, not a pooling or Flatten
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["act", "flat_shape"], ["flat"]))
    features = CHANNELS if pool else CHANNELS * 64
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, features)).astype(np.float32), "fc1w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "fc1b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (3, 8)).astype(np.float32), "fc2w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fc2b"),
    ]
    nodes += [
        helper.make_node("Gemm", ["flat", "fc1w", "fc1b"], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["hidden_act"]),
        helper.make_node("Gemm", ["hidden_act", "fc2w", "fc2b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


class _Pixels(CalibrationDataReader):
    def __init__(self) -> None:
        self._batches = iter([{"x": _pixels()}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantized(fmt: str, src: Path, dst: Path) -> onnx.ModelProto:
    if fmt == "dynamic":
        quantize_dynamic(src, dst)
    elif fmt != "fp32":
        quant_format = QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ
        # uint8 activations: onnxruntime's CPU QGemm has no int8-activation kernel.
        quantize_static(
            src,
            dst,
            _Pixels(),
            quant_format=quant_format,
            per_channel=True,
            activation_type=QuantType.QUInt8,
        )
    return onnx.load(str(src if fmt == "fp32" else dst))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[tuple[str, bool, bool], onnx.ModelProto]:
    """Every (format, pool, bias_as_add) variant, quantized once."""
    folder = tmp_path_factory.mktemp("graph_probe")
    built = {}
    for pool in (True, False):
        for bias_as_add in (True, False):
            src = folder / f"float_{pool}_{bias_as_add}.onnx"
            onnx.save(_float_cnn(pool, bias_as_add), str(src))
            for fmt in FORMATS:
                dst = folder / f"{fmt}_{pool}_{bias_as_add}.onnx"
                built[fmt, pool, bias_as_add] = _quantized(fmt, src, dst)
    return built


def _run(model: onnx.ModelProto, outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads=1), providers=["CPUExecutionProvider"]
    )
    return session.run(outputs, {"x": _pixels()})


def _float_tensor(pool: bool, bias_as_add: bool, name: str) -> np.ndarray:
    """A tensor of the float graph, exposed as an extra output."""
    exposed = _float_cnn(pool, bias_as_add)
    exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    return _run(exposed, [name])[0]


def _read(model: onnx.ModelProto, probe: ProbePoint) -> np.ndarray:
    return probe.decode(_run(add_probe_outputs(model, [probe]), [probe.tensor])[0])


def _scale(model: onnx.ModelProto, name: str) -> float:
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return float(inits[name])


def _rounding_bound(model: onnx.ModelProto, fmt: str, bias_as_add: bool, probe: ProbePoint):
    """Worst-case rounding between the probe and the float activation.

    Static formats round once where the activation is quantized (half its step); with a
    separate bias ``Add`` the conv output and the bias are quantized too (half a step each).
    Dynamic graphs dequantize exactly here (inputs and weights lie on their grids).
    """
    if fmt in ("fp32", "dynamic"):
        return 1e-5
    bound = 0.5 * probe.scale
    if bias_as_add:
        bound += 0.5 * (_scale(model, "conv_scale") + _scale(model, "b_scale"))
    return bound


@pytest.mark.parametrize("bias_as_add", [True, False], ids=["bias_add", "conv_bias"])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "no_pool"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_last_conv_probe_is_the_activation_after_bias_and_relu(graphs, fmt, pool, bias_as_add):
    model = graphs[fmt, pool, bias_as_add]
    probe = discover_layers(model)["last_conv"]
    got = _read(model, probe)
    activation = _float_tensor(pool, bias_as_add, "act")
    bound = _rounding_bound(model, fmt, bias_as_add, probe)
    assert got.shape == activation.shape == (8, CHANNELS, 8, 8)
    assert np.abs(got - activation).max() <= bound
    # The bound really separates the activation from the raw conv output: bias and ReLU moved
    # values by far more than the quantization rounding.
    pre_activation = _float_tensor(pool, bias_as_add, "biased") - BIASES.reshape(1, -1, 1, 1)
    assert np.abs(pre_activation - activation).max() > 20 * bound
    assert np.mean(got == 0.0) > 0.2  # ReLU zeros survive as exact zeros


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "no_pool"])
def test_qoperator_probes_read_the_integer_tensors_of_the_qlinear_ops(graphs, pool):
    model = graphs["qoperator", pool, True]
    probes = discover_layers(model)
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    assert producers[probes["last_conv"].tensor] == "QLinearAdd"
    assert probes["last_conv"].integer_dtype == "uint8"
    assert producers[probes["penultimate"].tensor] == "QGemm"
    hidden = _float_tensor(pool, True, "hidden_act")
    got = _read(model, probes["penultimate"])
    assert np.linalg.norm(got - hidden) / np.linalg.norm(hidden) < 0.05


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "no_pool"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_probing_leaves_the_logits_unchanged(graphs, fmt, pool):
    model = graphs[fmt, pool, True]
    probes = list(discover_layers(model).values())
    plain = _run(model, ["logits"])[0]
    probed = _run(add_probe_outputs(model, probes), ["logits"])[0]
    np.testing.assert_array_equal(plain, probed)


@pytest.mark.parametrize("bias_as_add", [True, False], ids=["bias_add", "conv_bias"])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "no_pool"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_masked_channels_are_exactly_zero_and_the_others_unchanged(graphs, fmt, pool, bias_as_add):
    model = graphs[fmt, pool, bias_as_add]
    probe = discover_layers(model)["last_conv"]
    before = _read(model, probe)
    masked, masked_probe = mask_channels(model, probe, KEEP)
    after = _read(masked, masked_probe)
    assert np.all(after[:, ~KEEP] == 0.0)
    assert np.any(before[:, ~KEEP] != 0.0)
    np.testing.assert_array_equal(after[:, KEEP], before[:, KEEP])
    assert not np.allclose(_run(masked, ["logits"])[0], _run(model, ["logits"])[0])
    # The integer kernels are still there: masking adds nodes and replaces none.
    kept_ops = [node.op_type for node in model.graph.node]
    masked_ops = [node.op_type for node in masked.graph.node]
    assert all(masked_ops.count(op) >= kept_ops.count(op) for op in set(kept_ops))


def test_qoperator_mask_writes_the_zero_point_in_the_integer_domain(graphs):
    model = graphs["qoperator", True, True]
    probe = discover_layers(model)["last_conv"]
    masked, masked_probe = mask_channels(model, probe, KEEP)
    raw = _run(add_probe_outputs(masked, [masked_probe]), [masked_probe.tensor])[0]
    assert raw.dtype == np.uint8
    assert np.all(raw[:, ~KEEP] == probe.zero_point)
    consumers = [n.op_type for n in masked.graph.node if masked_probe.tensor in n.input]
    assert consumers == ["QLinearGlobalAveragePool"]


def _accumulator_graph() -> onnx.ModelProto:
    """DynamicQuantizeLinear → ConvInteger → Flatten → Cast → MatMul: the int32 accumulator is
    the last conv tensor with a channel structure."""
    rng = np.random.default_rng(3)
    weights = rng.integers(-127, 128, (CHANNELS, 1, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "w", "xz"], ["acc"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["acc"], ["flat"]),
        helper.make_node("Cast", ["flat"], ["flat_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["flat_f", "fc"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(rng.normal(0, 1e-3, (CHANNELS * 64, 3)).astype(np.float32), "fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "accumulator",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_int32_accumulator_is_masked_with_zero():
    model = _accumulator_graph()
    probe = discover_layers(model)["last_conv"]
    assert (probe.tensor, probe.integer_dtype) == ("acc", "int32")
    before = _run(add_probe_outputs(model, [probe]), ["acc"])[0]
    masked, masked_probe = mask_channels(model, probe, KEEP)
    after = _run(add_probe_outputs(masked, [masked_probe]), [masked_probe.tensor])[0]
    assert after.dtype == np.int32
    assert np.all(after[:, ~KEEP] == 0) and np.any(before[:, ~KEEP] != 0)
    np.testing.assert_array_equal(after[:, KEEP], before[:, KEEP])
