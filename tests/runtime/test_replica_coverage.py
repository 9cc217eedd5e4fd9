"""Op coverage of the gradient replica: every converter added for real vendor classifiers computes
what onnxruntime computes (float ops to 1e-5, integer ops to the exact code) and gives gradients,
and every op it does not know is still refused at build time.

Each test builds a tiny graph with ``onnx.helper`` (or quantizes a tiny float model with
``quantize_static(..., quant_format=QuantFormat.QOperator)``), runs it in an onnxruntime session
built as the harness builds them (``session_options("exact", threads=1)``) and through
``build_replica`` on the same random input.
"""

from __future__ import annotations

import itertools
import logging
import warnings
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from harness.core.errors import ModelError
from harness.replica.interpreter import build_replica
from harness.replica.ops.qoperator import mlas_logistic
from harness.runtime.kernels import EXACT, probe_host, session_options

MS_DOMAIN = "com.microsoft"


# ---------------------------------------------------------------------------------- helpers
def _model(
    nodes: list[onnx.NodeProto],
    x_shape: list,
    inits: list[onnx.TensorProto] = (),
    opset: int = 13,
    x_type: int = TensorProto.FLOAT,
    y_type: int | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "coverage",
        [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info("y", x_type if y_type is None else y_type, None)],
        list(inits),
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _ort(model: onnx.ModelProto, x: np.ndarray, profile: str = "exact") -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(profile, threads=1),
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ours(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_replica(model)(torch.from_numpy(x.astype(np.float32))).numpy()


def _t(name: str, values, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _node(op: str, inputs: list[str], domain: str = "", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["y"], name=f"{op.lower()}_node", domain=domain, **attrs)


RNG = np.random.default_rng(0)
W_GROUP = RNG.normal(size=(6, 2, 3, 3)).astype(np.float32)  # group=2 over 4 input channels
W_DEPTH = RNG.normal(size=(4, 1, 3, 3)).astype(np.float32)  # depthwise over 4 channels

# (id, nodes, initializers, input shape, opset)
FLOAT_CASES = [
    ("pad-constant-input", [_node("Pad", ["x", "p", "v"])],
     [_t("p", [0, 0, 1, 2, 0, 0, 2, 1], np.int64), _t("v", 0.75)], [2, 3, 5, 6], 13),
    ("pad-reflect-input", [_node("Pad", ["x", "p"], mode="reflect")],
     [_t("p", [0, 1, 2, 3, 0, 2, 1, 4], np.int64)], [2, 3, 5, 6], 13),
    ("pad-edge-negative", [_node("Pad", ["x", "p"], mode="edge")],
     [_t("p", [0, 0, -1, 3, 0, 0, 2, -2], np.int64)], [2, 3, 5, 6], 13),
    ("pad-axes-input", [_node("Pad", ["x", "p", "", "a"], mode="reflect")],
     [_t("p", [1, 2, 2, 1], np.int64), _t("a", [-1, 2], np.int64)], [2, 3, 5, 6], 18),
    ("pad-wrap", [_node("Pad", ["x", "p"], mode="wrap")],
     [_t("p", [0, 0, 2, 1, 0, 0, 1, 3], np.int64)], [2, 3, 5, 6], 19),
    ("pad-constant-attr", [_node("Pad", ["x"], pads=[0, 0, 2, 1, 0, 0, 1, 3], value=-1.5)],
     [], [2, 3, 5, 6], 10),
    ("pad-reflect-attr", [_node("Pad", ["x"], mode="reflect", pads=[0, 0, 1, 1, 0, 0, 2, 2])],
     [], [2, 3, 5, 6], 10),
    ("pad-edge-attr", [_node("Pad", ["x"], mode="edge", pads=[0, 0, 3, 0, 0, 0, 0, 2])],
     [], [2, 3, 5, 6], 2),
    ("constant-of-shape", [helper.make_node("ConstantOfShape", ["s"], ["c"], value=_t("v", [0.5])),
                           _node("Add", ["x", "c"])], [_t("s", [3, 1, 4], np.int64)],
     [2, 3, 1, 4], 13),
    ("selu", [_node("Selu", ["x"])], [], [2, 3, 4, 4], 13),
    ("selu-attrs", [_node("Selu", ["x"], alpha=1.3, gamma=0.9)], [], [2, 3, 4, 4], 13),
    ("elu", [_node("Elu", ["x"], alpha=0.7)], [], [2, 3, 4, 4], 13),
    ("hard-sigmoid", [_node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], [], [2, 3, 4, 4], 13),
    ("hard-swish", [_node("HardSwish", ["x"])], [], [2, 3, 4, 4], 14),
    ("prelu-per-channel", [_node("PRelu", ["x", "s"])],
     [_t("s", RNG.uniform(0.05, 0.5, (3, 1, 1)))], [2, 3, 4, 4], 13),
    ("concat", [_node("Concat", ["x", "c", "x"], axis=0)],
     [_t("c", RNG.normal(size=(1, 3, 4, 4)))], [2, 3, 4, 4], 13),
    ("concat-negative-axis", [_node("Concat", ["x", "x"], axis=-1)], [], [2, 3, 4, 4], 13),
    ("reshape-zero-minus-one", [_node("Reshape", ["x", "s"])],
     [_t("s", [0, -1, 4], np.int64)], [2, 3, 4, 4], 13),
    ("reshape-allowzero", [_node("Reshape", ["x", "s"], allowzero=1)],
     [_t("s", [3, -1, 2], np.int64)], [2, 3, 4], 14),
    ("flatten-axis-0", [_node("Flatten", ["x"], axis=0)], [], [2, 3, 4, 5], 13),
    ("flatten-axis-2", [_node("Flatten", ["x"], axis=2)], [], [2, 3, 4, 5], 13),
    ("flatten-axis-minus-3", [_node("Flatten", ["x"], axis=-3)], [], [2, 3, 4, 5], 13),
    ("flatten-axis-4", [_node("Flatten", ["x"], axis=4)], [], [2, 3, 4, 5], 13),
    ("transpose-perm", [_node("Transpose", ["x"], perm=[0, 2, 3, 1])], [], [2, 3, 4, 5], 13),
    ("transpose-default", [_node("Transpose", ["x"])], [], [2, 3, 4, 5], 13),
    ("squeeze-attr", [_node("Squeeze", ["x"], axes=[1, -1])], [], [2, 1, 4, 1], 11),
    ("squeeze-input", [_node("Squeeze", ["x", "a"])], [_t("a", [-1], np.int64)], [2, 1, 4, 1], 13),
    ("squeeze-all", [_node("Squeeze", ["x"])], [], [2, 1, 4, 1], 13),
    ("unsqueeze-attr", [_node("Unsqueeze", ["x"], axes=[0, -1])], [], [2, 3, 4], 11),
    ("unsqueeze-input", [_node("Unsqueeze", ["x", "a"])], [_t("a", [1, -1], np.int64)],
     [2, 3, 4], 13),
    ("conv-grouped", [_node("Conv", ["x", "w"], group=2, pads=[1, 1, 1, 1])],
     [_t("w", W_GROUP)], [2, 4, 6, 6], 13),
    ("conv-depthwise", [_node("Conv", ["x", "w", "b"], group=4, strides=[2, 2])],
     [_t("w", W_DEPTH), _t("b", RNG.normal(size=4))], [2, 4, 7, 7], 13),
    ("maxpool", [_node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
     [], [2, 3, 7, 7], 13),
    ("averagepool", [_node("AveragePool", ["x"], kernel_shape=[3, 2], strides=[2, 1],
                           pads=[1, 0, 1, 1], count_include_pad=1)], [], [2, 3, 7, 7], 13),
    ("globalaveragepool", [_node("GlobalAveragePool", ["x"])], [], [2, 3, 7, 7], 13),
    ("upsample-nearest-input", [_node("Upsample", ["x", "s"], mode="nearest")],
     [_t("s", [1, 1, 2, 3])], [2, 3, 4, 5], 9),
    ("upsample-nearest-fractional", [_node("Upsample", ["x", "s"])],
     [_t("s", [1, 1, 1.5, 2.5])], [2, 3, 4, 5], 9),
    ("upsample-nearest-attr", [_node("Upsample", ["x"], scales=[1.0, 1.0, 2.0, 2.0])],
     [], [2, 3, 4, 5], 7),
    ("batchnorm-inference", [_node("BatchNormalization", ["x", "g", "b", "m", "v"], epsilon=1e-3)],
     [_t("g", RNG.uniform(0.5, 2, 3)), _t("b", RNG.normal(size=3)), _t("m", RNG.normal(size=3)),
      _t("v", RNG.uniform(0.5, 2, 3))], [2, 3, 4, 4], 13),
]  # fmt: skip


@pytest.mark.parametrize(
    ("nodes", "inits", "shape", "opset"),
    [case[1:] for case in FLOAT_CASES],
    ids=[case[0] for case in FLOAT_CASES],
)
def test_float_op_matches_onnxruntime(nodes, inits, shape, opset):
    model = _model(nodes, [None, *shape[1:]], inits, opset)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 2
    expected = _ort(model, x)
    ours = _ours(model, x)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("allowzero", "shape"), [(0, [2, 0, 4]), (1, [4, 0, 3])])
def test_reshape_zero_entries_copy_or_stay_zero_as_allowzero_says(allowzero, shape):
    """allowzero=0: a 0 copies the input's dimension; allowzero=1: it is a literal 0 (only an empty
    tensor reshapes to it; the input's dims are left undeclared so the build-time dry run, which
    feeds one sample, is skipped)."""
    nodes = [_node("Reshape", ["x", "s"], allowzero=allowzero)]
    model = _model(nodes, [None, None, None], [_t("s", shape, np.int64)], opset=14)
    x = np.zeros((2, 0, 12) if allowzero else (2, 3, 4), dtype=np.float32)
    x = x.reshape((0, 3, 4)) if allowzero else x
    expected = _ort(model, x)
    assert _ours(model, x).shape == expected.shape == (4, 0, 3) if allowzero else (2, 3, 4)


# ---------------------------------------------------------------------------------- integer ops
def _codes(shape, signed: bool, rng) -> np.ndarray:
    low, high = (-128, 128) if signed else (0, 256)
    return rng.integers(low, high, shape).astype(np.int8 if signed else np.uint8)


def _qtype(signed: bool) -> tuple[int, type]:
    return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)


def _profile(signed: bool) -> str:
    """The kernel profile to compare int8 *activations* under.

    onnxruntime cannot load QLinearConv / QLinearMatMul with int8 activations under the "exact"
    profile (its ``session.x64quantprecision`` rewrite leaves an NHWC QLinearConv / QLinearMatMul
    that only has a uint8 kernel: NOT_IMPLEMENTED at session creation). Such graphs are compared
    under "host" where the measured host kernels are int32-exact anyway (VNNI/AMX, Arm), i.e.
    compute what "exact" means; on a saturating host there is no exact reference to compare to.
    """
    if not signed:
        return "exact"
    if probe_host().kernel_class != EXACT:
        pytest.skip("int8-activation QOperator graphs need int32-exact host kernels to compare")
    return "host"


def _assert_same_codes(model: onnx.ModelProto, x: np.ndarray, profile: str = "exact") -> None:
    expected = _ort(model, x, profile)
    ours = _ours(model, x)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected.astype(np.float32))


@pytest.mark.parametrize("group", [2, 4])
def test_conv_integer_honours_group(group):
    rng = np.random.default_rng(group)
    w = _codes((4, 4 // group, 3, 3), True, rng)
    nodes = [_node("ConvInteger", ["x", "w", "xz", "wz"], group=group, pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w, "w"), _t("xz", 131, np.uint8), _t("wz", 3, np.int8)]
    model = _model(
        nodes, [None, 4, 6, 6], inits, x_type=TensorProto.UINT8, y_type=TensorProto.INT32
    )
    _assert_same_codes(model, _codes((2, 4, 6, 6), False, rng))


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_qlinear_conv_honours_group_with_per_channel_scales(group, signed):
    rng = np.random.default_rng(10 + group)
    qtype, np_type = _qtype(signed)
    nodes = [
        _node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], group=group,
              pads=[1, 1, 1, 1], strides=[1, 2])
    ]  # fmt: skip
    inits = [
        _t("xs", 0.02), _t("xz", 5 if signed else 130, np_type),
        numpy_helper.from_array(_codes((4, 4 // group, 3, 3), True, rng), "w"),
        _t("ws", rng.uniform(0.002, 0.02, 4)), _t("wz", np.zeros(4), np.int8),
        _t("ys", 0.05), _t("yz", -3 if signed else 120, np_type),
        _t("b", rng.integers(-2000, 2000, 4), np.int32),
    ]  # fmt: skip
    model = _model(nodes, [None, 4, 6, 6], inits, x_type=qtype)
    _assert_same_codes(model, _codes((2, 4, 6, 6), signed, rng), _profile(signed))


def _contrib_params(signed: bool, pow2: bool, rng) -> list[onnx.TensorProto]:
    """Scales and zero points a, b, c. Power-of-two scales make exact halves common, so they
    check the rounding (half to even, zero point added before or after rounding)."""
    _, np_type = _qtype(signed)
    low, high = (-20, 20) if signed else (100, 150)
    inits = []
    for name in "abc":
        scale = 2.0 ** -rng.integers(2, 7) if pow2 else rng.uniform(0.005, 0.1)
        inits += [_t(f"s{name}", scale), _t(f"z{name}", rng.integers(low, high), np_type)]
    return inits


def _pool(op: str, **attrs) -> list[onnx.NodeProto]:
    return [_node(op, ["x", "sa", "za", "sc", "zc"], domain=MS_DOMAIN, **attrs)]


def _binary(op: str, other: str) -> list[onnx.NodeProto]:
    return [_node(op, ["x", "sa", "za", other, "sb", "zb", "sc", "zc"], domain=MS_DOMAIN)]


# (id, nodes, input shape): "x2" is x reversed along its last axis, "k" a per-channel constant
CONTRIB_CASES = [
    ("add", _binary("QLinearAdd", "x2"), [2, 4, 7, 7]),
    ("add-broadcast", _binary("QLinearAdd", "k"), [2, 4, 7, 7]),
    ("mul", _binary("QLinearMul", "x2"), [2, 4, 7, 7]),
    ("mul-broadcast", _binary("QLinearMul", "k"), [2, 4, 7, 7]),
    ("sigmoid", _pool("QLinearSigmoid"), [2, 4, 7, 7]),
    ("leaky-relu", _pool("QLinearLeakyRelu", alpha=0.13), [2, 4, 7, 7]),
    ("global-average-pool", _pool("QLinearGlobalAveragePool", channels_last=0), [2, 4, 7, 7]),
    ("global-average-pool-nhwc", _pool("QLinearGlobalAveragePool", channels_last=1), [2, 7, 7, 4]),
    ("average-pool-pads", _pool("QLinearAveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]), [2, 4, 7, 7]),
    ("average-pool-count-pad", _pool("QLinearAveragePool", kernel_shape=[3, 2], strides=[1, 2],
                                     pads=[1, 0, 1, 1], count_include_pad=1), [2, 4, 7, 7]),
    ("average-pool-ceil", _pool("QLinearAveragePool", kernel_shape=[2, 2], strides=[2, 2],
                                ceil_mode=1), [2, 4, 7, 7]),
    ("average-pool-auto-pad", _pool("QLinearAveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                    auto_pad="SAME_UPPER"), [2, 4, 7, 7]),
    ("average-pool-nhwc", _pool("QLinearAveragePool", kernel_shape=[2, 3], strides=[2, 2],
                                channels_last=1), [2, 7, 7, 4]),
    ("average-pool-1d", _pool("QLinearAveragePool", kernel_shape=[3], strides=[2]), [2, 4, 9]),
    ("average-pool-whole-image", _pool("QLinearAveragePool", kernel_shape=[7, 7]), [2, 4, 7, 7]),
    # 16 pixels: with power-of-two scales the averages hit exact halves, where onnxruntime's
    # whole-image fallback (integer sum, zero point added after rounding) differs from its
    # windowed kernel (zero point added before rounding)
    ("average-pool-whole-image-16", _pool("QLinearAveragePool", kernel_shape=[4, 4]),
     [2, 4, 4, 4]),
    ("global-average-pool-16", _pool("QLinearGlobalAveragePool"), [2, 4, 4, 4]),
    ("concat", [_node("QLinearConcat", ["sc", "zc", "x", "sa", "za", "x2", "sb", "zb", "x", "sc",
                                        "zc"], domain=MS_DOMAIN, axis=1)], [2, 4, 7, 7]),
]  # fmt: skip


@pytest.mark.parametrize("pow2", [False, True], ids=["scales", "pow2-scales"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize(
    ("nodes", "shape"), [case[1:] for case in CONTRIB_CASES], ids=[c[0] for c in CONTRIB_CASES]
)
def test_qoperator_contrib_op_matches_onnxruntime_codes(nodes, shape, signed, pow2):
    """Exact codes: the replica reproduces the MLAS kernels' float32 steps and rounding."""
    rng = np.random.default_rng(zlib.crc32(f"{nodes}{shape}{signed}{pow2}".encode()))
    qtype, _ = _qtype(signed)
    inits = _contrib_params(signed, pow2, rng)
    inits.append(numpy_helper.from_array(_codes((1, shape[1], 1, 1), signed, rng), "k"))
    reverse = [_t(n, [v], np.int64) for n, v in (("st", -1), ("en", -(2**62)), ("ax", -1))]
    flip = helper.make_node("Slice", ["x", "st", "en", "ax", "st"], ["x2"])
    model = _model([flip, *nodes], [None, *shape[1:]], inits + reverse, x_type=qtype)
    for _trial in range(3):
        _assert_same_codes(model, _codes(shape, signed, rng))


@pytest.mark.parametrize("op", ["QLinearAveragePool", "QLinearGlobalAveragePool"])
def test_whole_image_average_adds_the_zero_point_after_rounding(op):
    """An average of exactly 2.5 with output zero point 101: onnxruntime's global-pool kernel
    (also QLinearAveragePool's whole-image fallback) rounds, then adds: 103; its windowed kernel
    adds first, round(103.5) = 104, as the window that does not cover the whole image shows."""
    image = np.zeros((1, 1, 4, 5), dtype=np.uint8)
    image[0, 0, :2, :4] = 5  # first 4x4 window: sum 40, mean 2.5; second: sum 35
    attrs = {"kernel_shape": [4, 4]} if op == "QLinearAveragePool" else {}
    inits = [_t("sa", 0.25), _t("za", 0, np.uint8), _t("sc", 0.25), _t("zc", 101, np.uint8)]
    whole = _model(_pool(op, **attrs), [1, 1, 4, 4], inits, x_type=TensorProto.UINT8)
    expected = _ort(whole, image[..., :4])
    assert expected.ravel().tolist() == [103]
    np.testing.assert_array_equal(_ours(whole, image[..., :4]), expected)
    if op == "QLinearAveragePool":
        windowed = _model(_pool(op, **attrs), [1, 1, 4, 5], inits, x_type=TensorProto.UINT8)
        expected = _ort(windowed, image)
        assert expected.ravel().tolist() == [104, 103]  # round(103.5), round(101 + 2.1875)
        np.testing.assert_array_equal(_ours(windowed, image), expected)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("output", ["quantized", "float"])
@pytest.mark.parametrize("per_column", [False, True], ids=["per-tensor", "per-column"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_qgemm_matches_onnxruntime(signed, output, per_column, trans_b):
    """com.microsoft.QGemm, what QOperator quantization makes of a Gemm (a vendor file's
    classifier head): int32 bias, per-column weight scales, float or requantized output."""
    rng = np.random.default_rng(zlib.crc32(f"qgemm{signed}{output}{per_column}{trans_b}".encode()))
    qtype, np_type = _qtype(signed)
    k, n = 24, 7
    w = rng.integers(-128, 128, (n, k) if trans_b else (k, n)).astype(np.int8)
    b_scale = rng.uniform(0.002, 0.02, n if per_column else ()).astype(np.float32)
    inits = [
        _t("sa", rng.uniform(0.01, 0.05)),
        _t("za", rng.integers(-10, 10) if signed else rng.integers(100, 150), np_type),
        numpy_helper.from_array(w, "w"),
        _t("sb", b_scale),
        _t("zb", np.zeros(n if per_column else (), np.int8), np.int8),
        _t("c", rng.integers(-5000, 5000, n), np.int32),
    ]
    names = ["x", "sa", "za", "w", "sb", "zb", "c"]
    if output == "quantized":
        inits += [_t("sy", 0.37), _t("zy", 3 if signed else 131, np_type)]
        names += ["sy", "zy"]
    node = _node("QGemm", names, domain=MS_DOMAIN, transB=trans_b, alpha=1.0)
    y_type = qtype if output == "quantized" else TensorProto.FLOAT
    model = _model([node], [None, k], inits, x_type=qtype, y_type=y_type)
    x = _codes((9, k), signed, rng)
    expected = _ort(model, x, _profile(signed))
    ours = _ours(model, x)
    if output == "quantized":
        np.testing.assert_array_equal(ours, expected.astype(np.float32))
    else:  # float output: the same int32 accumulator times the same float32 scale
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    assert len(np.unique(expected)) > 10  # not a saturated constant


def test_upsample_linear_is_refused_in_one_line():
    model = _model([_node("Upsample", ["x", "s"], mode="linear")], [None, 3, 4, 4],
                   [_t("s", [1, 1, 2, 2])], opset=9)  # fmt: skip
    with pytest.raises(ModelError, match="mode 'linear' is not supported") as err:
        build_replica(model)
    assert "\n" not in str(err.value)


def test_qlinear_conv_requantizes_with_mlas_combined_scale():
    """MLAS requantizes ``round(acc * fl(fl(x_scale * w_scale) / y_scale))``; dividing the
    dequantized accumulator by y_scale instead rounds differently for some accumulators. Find
    one and check the replica gives onnxruntime's code for it."""
    f32, rng = np.float32, np.random.default_rng(3)
    accs = np.arange(-(2**15), 2**15).astype(f32)
    while True:
        xs, ws, ys = (
            f32(rng.uniform(lo, hi)) for lo, hi in ((1e-3, 0.05), (1e-3, 0.05), (0.01, 0.5))
        )
        mlas, other = np.round(accs * (xs * ws / ys)), np.round(accs * (xs * ws) / ys)
        hits = np.nonzero((mlas != other) & (np.abs(mlas) <= 100))[0]
        if len(hits):
            break
    acc = int(accs[hits[0]])
    # 1x1 conv, one channel, w = 1: acc = x + bias for the 256 codes x
    nodes = [_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"])]
    inits = [
        _t("xs", xs), _t("xz", 0, np.uint8), _t("w", [[[[1]]]], np.int8), _t("ws", [ws]),
        _t("wz", [0], np.int8), _t("ys", ys), _t("yz", 128, np.uint8), _t("b", [acc - 100], np.int32),
    ]  # fmt: skip
    model = _model(nodes, [1, 1, 16, 16], inits, x_type=TensorProto.UINT8)
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    expected = _ort(model, x).astype(np.float32)
    np.testing.assert_array_equal(_ours(model, x), expected)
    assert expected.ravel()[100] == mlas[hits[0]] + 128 != other[hits[0]] + 128


def test_mlas_logistic_reproduces_onnxruntime_sigmoid():
    """onnxruntime's sigmoid is MLAS's rational approximation, not the exact function; the
    replica's emulation gives its float32 values bit for bit (FMA3 kernel, x86-64)."""
    x = np.random.default_rng(4).normal(0, 6, (1, 50_000)).astype(np.float32)
    model = _model([_node("Sigmoid", ["x"])], [1, x.shape[1]])
    ours = mlas_logistic(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, _ort(model, x))
    assert not np.array_equal(torch.sigmoid(torch.from_numpy(x)).numpy(), ours)


def test_qlinear_sigmoid_table_rounds_like_onnxruntime():
    """Scales chosen so MLAS's sigmoid and the exact sigmoid of one code fall on two sides of a
    rounding boundary: only the emulated table gives onnxruntime's codes for all 256 inputs."""
    codes = torch.arange(256, dtype=torch.float32)
    rng = np.random.default_rng(5)
    while True:
        xs, xz = np.float32(rng.uniform(0.01, 0.1)), int(rng.integers(0, 256))
        values = (codes - xz) * torch.tensor(xs)
        mlas, exact = mlas_logistic(values), torch.sigmoid(values)
        for i in torch.nonzero(mlas != exact).ravel().tolist():
            ys = torch.tensor(np.float32((mlas[i] + exact[i]).item() / 2 / 200.5))
            if torch.round(mlas[i] / ys) != torch.round(exact[i] / ys):
                break
        else:
            continue
        break
    inits = [_t("sa", xs), _t("za", xz, np.uint8), _t("sc", ys.item()), _t("zc", 0, np.uint8)]
    model = _model(_pool("QLinearSigmoid"), [1, 256], inits, x_type=TensorProto.UINT8)
    x = np.arange(256, dtype=np.uint8).reshape(1, 256)
    expected = _ort(model, x).astype(np.float32)
    np.testing.assert_array_equal(_ours(model, x), expected)
    naive = torch.clamp(torch.round(exact / ys), 0, 255).numpy()
    assert naive[i] != expected[0, i]


# ---------------------------------------------------------------------------------- QOperator
class _QOperatorNet(torch.nn.Module):
    """A small classifier whose QOperator quantization uses every op above: QLinearConv (plain,
    depthwise, grouped), QLinearLeakyRelu, QLinearSigmoid, QLinearAdd, QLinearMul, QLinearConcat,
    QLinearAveragePool, MaxPool, QLinearGlobalAveragePool, QLinearMatMul, and Pad, Reshape,
    Flatten and Transpose on quantized tensors. Its head is a MatMul, not a Gemm: onnxruntime
    writes a Gemm as com.microsoft.QGemm, which the replica does not implement."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = torch.nn.Conv2d(16, 8, 1, groups=2)
        self.head = torch.nn.Parameter(torch.randn(8, 10) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x):
        fn = torch.nn.functional
        y = fn.leaky_relu(self.conv(fn.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1]), 0.1)
        z = torch.sigmoid(self.depthwise(y))
        y = torch.cat([y + z, y * z], dim=1)
        y = fn.avg_pool2d(self.grouped(y), 2)
        y = fn.max_pool2d(y, 2).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        g = fn.adaptive_avg_pool2d(y, 1).flatten(1)
        return torch.matmul(g, self.head) + self.bias


def _qoperator_model(tmp_path, activation: str) -> tuple[onnx.ModelProto, np.ndarray]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    torch.manual_seed(0)
    fp32, int8 = tmp_path / "net.onnx", tmp_path / f"net-{activation}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _QOperatorNet().eval(),
            (torch.zeros(1, 3, 8, 8),),
            str(fp32),
            opset_version=13,
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    rng = np.random.default_rng(0)
    calibration = [rng.normal(size=(8, 3, 8, 8)).astype(np.float32) for _ in range(2)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": batch} for batch in calibration])

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice
    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QOperator,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
    )
    return onnx.load(str(int8)), rng.normal(size=(16, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("activation", ["u8", "s8"])
def test_qoperator_classifier_matches_onnxruntime_and_gives_gradients(tmp_path, activation):
    model, x = _qoperator_model(tmp_path, activation)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    expected_ops = {
        (MS_DOMAIN, op)
        for op in ("QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
                   "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool")
    } | {("", "QLinearConv"), ("", "QLinearMatMul"), ("", "MaxPool"), ("", "Pad")}  # fmt: skip
    assert expected_ops <= ops
    assert any(n.op_type == "QLinearConv" and helper.get_attribute_value(a) == 8
               for n in model.graph.node for a in n.attribute if a.name == "group")  # fmt: skip

    expected = _ort(model, x, _profile(activation == "s8"))
    ours = _ours(model, x)
    # every step reproduces onnxruntime's arithmetic, so the dequantized logits are identical
    np.testing.assert_array_equal(ours, expected)
    assert np.ptp(expected) > 0

    pixels = torch.from_numpy(x[:4]).requires_grad_(True)
    weights = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32))
    (build_replica(model)(pixels) * weights).sum().backward()
    grad = pixels.grad.numpy()
    assert np.isfinite(grad).all()
    assert np.mean(grad != 0) > 0.3  # straight-through: zero only where a clamp saturates


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("op", "domain", "shown"),
    [
        ("FusedGemm", MS_DOMAIN, "'com.microsoft.FusedGemm'"),
        ("QLinearFrobnicate", MS_DOMAIN, "'com.microsoft.QLinearFrobnicate'"),
        ("Magic", "vendor.custom", "'vendor.custom.Magic'"),
        ("QLinearAdd", "vendor.custom", "'vendor.custom.QLinearAdd'"),
        ("QLinearAdd", "", "'QLinearAdd'"),  # contrib ops only in their own domain
    ],
)
def test_unknown_custom_op_is_refused_in_one_line(op, domain, shown):
    node = helper.make_node(op, ["x"], ["y"], name="odd_node", domain=domain)
    model = _model([node], [1, 4])
    with pytest.raises(ModelError, match=f"unsupported ONNX op {shown} \\(node odd_node\\)") as err:
        build_replica(model)
    assert "\n" not in str(err.value)


def _pool_cases() -> list[tuple]:
    """Pooling geometries where a pre-padded input and onnxruntime's rules can part: ceil mode
    with asymmetric pads (a last window starting in the end padding), dilation, pads as large
    as the kernel allows."""
    cases = []
    for op, size, kernel, stride, begin, end, dilation in itertools.product(
        ("MaxPool", "AveragePool"), (6, 7), (2, 3), (2, 3), (0, 1, 2), (0, 1, 2), (1, 2)
    ):
        if begin >= kernel or end >= kernel or (op == "AveragePool" and dilation > 1):
            continue
        cases.append((op, size, kernel, stride, begin, end, dilation))
    return cases


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_pooling_geometry_matches_onnxruntime(ceil_mode):
    rng = np.random.default_rng(0)
    for op, size, kernel, stride, begin, end, dilation in _pool_cases():
        attrs = {
            "kernel_shape": [kernel, kernel],
            "strides": [stride, stride],
            "pads": [begin, begin, end, end],
            "ceil_mode": ceil_mode,
        }
        if dilation > 1:
            attrs["dilations"] = [dilation, dilation]
        model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [1, 2, size, size], opset=19)
        x = rng.normal(size=(1, 2, size, size)).astype(np.float32)
        expected = _ort(model, x)
        got = build_replica(model)(torch.from_numpy(x)).detach().numpy()
        where = f"{op} size {size} kernel {kernel} stride {stride} pads {begin}/{end} d {dilation}"
        assert got.shape == expected.shape, where
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=where)


def test_max_pool_window_of_padding_only_gives_the_lowest_float_as_onnxruntime():
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2], dilations=[5], pads=[1, 1])
    model = _model([node], [1, 1, 4])
    x = np.array([[[-1.0, 2.0, -3.0, 4.0]]], dtype=np.float32)
    expected = _ort(model, x)
    assert expected.min() == np.finfo(np.float32).min  # onnxruntime's empty window
    np.testing.assert_array_equal(build_replica(model)(torch.from_numpy(x)).numpy(), expected)
