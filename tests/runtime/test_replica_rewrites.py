"""The replica's build-time rewrites must not change what Neural Cleanse sees, and must not fire
where the identity they rely on does not hold.

Dropping a repeated quantizer and pooling before Relu leave every logit and gradient
bit-identical to the replica with fused fake-quant only. Fusing a Q/DQ pair itself keeps the
values bit-identical, and its gradient is the STE's exact 1 where the unfused pair multiplies by
the scale and divides by it again (two float roundings), so against node-by-node interpretation
the gradients agree to float32 rounding."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import harness.replica.interpreter as replica_module
from harness.replica.interpreter import ReplicaModule, build_replica
from harness.replica.ops import NodeSpec
from harness.replica.rewrites import FAKE_QUANTIZE, fake_quantize
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.oracle import PixelReplica
from tests.conftest import PRECISIONS


def _logits_and_grads(module: PixelReplica, pixels: np.ndarray, seed: int):
    """Logits of a Neural-Cleanse-style stamped batch and the gradients of a random objective
    with respect to the mask and the pattern."""
    g = torch.Generator().manual_seed(seed)
    h, w, c = pixels.shape[1:]
    mask = torch.rand(h, w, generator=g).requires_grad_(True)
    pattern = (torch.rand(h, w, c, generator=g) * 255).requires_grad_(True)
    x = torch.from_numpy(pixels.astype(np.float32))
    logits = module((1 - mask[..., None]) * x + mask[..., None] * pattern)
    weights = torch.randn(logits.shape, generator=g)
    (logits * weights).sum().backward()
    return logits.detach(), mask.grad, pattern.grad


def _fused_only(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> ReplicaModule:
    """The replica with fake-quant fusion but neither exact rewrite (the reference for them)."""
    with monkeypatch.context() as patch:
        patch.setattr(replica_module, "drop_repeated_quantizers", lambda steps, *_: steps)
        patch.setattr(replica_module, "pool_before_relu", lambda steps, *_: steps)
        patch.setattr(replica_module, "centre_constant_weights", lambda steps, *_: steps)
        return build_replica(model)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rewrites_leave_logits_and_gradients_bit_identical(digits_world, precision, monkeypatch):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned[precision])
    plain = PixelReplica(build_replica(adapter.model, rewrites=False), adapter.preprocessing)
    fused = PixelReplica(_fused_only(adapter.model, monkeypatch), adapter.preprocessing)
    fast = PixelReplica(build_replica(adapter.model), adapter.preprocessing)
    # raw digits have flat backgrounds: exact ties in every pooling window and clamped codes
    for pixels, seed in [(digits_world.x_test[:48], 0), (digits_world.triggered_x[:48], 1)]:
        unfused = _logits_and_grads(plain, pixels, seed)
        expected = _logits_and_grads(fused, pixels, seed)
        got = _logits_and_grads(fast, pixels, seed)
        for name, a, b in zip(("logits", "mask grad", "pattern grad"), expected, got, strict=True):
            assert torch.equal(a, b), f"{precision}: {name} differs after the rewrites"
        assert torch.equal(unfused[0], got[0]), f"{precision}: fusion changed the logits"
        for a, b in zip(unfused[1:], got[1:], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    ops = [[s.spec.op for s in m.replica.steps] for m in (fused, fast)]
    assert ops[0] != ops[1], f"{precision}: no rewrite fired, so this test checked nothing"


def test_int8_static_requantization_after_pooling_is_dropped(digits_world):
    model = onnx.load(digits_world.poisoned["int8-static"])
    steps = build_replica(model).steps
    ops = [s.spec.op for s in steps]
    for i, op in enumerate(ops[:-1]):
        if op == "MaxPool":  # quantize_static writes Q/DQ with the input's parameters after it
            assert ops[i + 1] != FAKE_QUANTIZE, ops
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops


def test_fp32_pools_before_its_relus(digits_world):
    ops = [s.spec.op for s in build_replica(onnx.load(digits_world.poisoned["fp32"])).steps]
    pairs = list(pairwise(ops))
    assert ("MaxPool", "Relu") in pairs and ("Relu", "MaxPool") not in pairs


# ---------------------------------------------------------------------------------- hand-built
def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _qdq(src: str, dst: str, scale: str, zp: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("QuantizeLinear", [src, scale, zp], [f"{dst}_q"]),
        helper.make_node("DequantizeLinear", [f"{dst}_q", scale, zp], [dst]),
    ]


def _graph_model(nodes, inits, outputs=("y",), shape=(2, 2, 6, 6)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "rewrites",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _pool() -> onnx.NodeProto:
    return helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2])


def _value_and_grad(run, x: torch.Tensor, weights: torch.Tensor | None = None):
    """``run(x)`` and the gradient of ``sum(run(x) · weights)`` (plain sum without weights)
    with respect to ``x``. NaN outputs do not poison the gradient: it is the weights."""
    xi = x.clone().requires_grad_(True)
    y = run(xi)
    (y if weights is None else y * weights).sum().backward()
    return y.detach(), xi.grad


def _assert_bit_identical(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):  # bit for bit, NaN where NaN
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def _same_as_fused_only(
    model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, x: torch.Tensor | None = None
) -> None:
    if x is None:
        x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(3)) * 3
    expected = _value_and_grad(_fused_only(model, monkeypatch), x)
    _assert_bit_identical(expected, _value_and_grad(build_replica(model), x))


@pytest.mark.parametrize(
    ("second_scale", "second_zero_point"),
    [(0.2, np.uint8(0)), (0.1, np.int8(0))],
    ids=["another scale", "another range (int8 codes after uint8 ones, same zero point value)"],
)
def test_requantization_with_other_parameters_is_kept(second_scale, second_zero_point, monkeypatch):
    inits = [
        _const("s1", 0.1, np.float32),
        _const("s2", second_scale, np.float32),
        _const("z1", 0, np.uint8),
        _const("z2", second_zero_point, second_zero_point.dtype),
    ]
    nodes = [*_qdq("x", "a", "s1", "z1"), _pool(), *_qdq("p", "r", "s2", "z2")]
    model = _graph_model([*nodes, helper.make_node("Relu", ["r"], ["y"])], inits)
    assert _ops(model).count(FAKE_QUANTIZE) == 2
    _same_as_fused_only(model, monkeypatch)


def test_requantization_with_the_same_parameters_is_dropped_but_a_graph_output_is_kept(monkeypatch):
    inits = [_const("s", 0.1, np.float32), _const("z", 128, np.uint8)]
    hidden = [*_qdq("x", "a", "s", "z"), _pool(), *_qdq("p", "r", "s", "z")]
    tail = [helper.make_node("Relu", ["r"], ["y"])]
    model = _graph_model(hidden + tail, inits)
    assert [s.spec.op for s in build_replica(model).steps] == [FAKE_QUANTIZE, "MaxPool", "Relu"]
    _same_as_fused_only(model, monkeypatch)
    # the same quantizer writing the graph's output stays (its name must exist)
    model = _graph_model([*_qdq("x", "a", "s", "z"), _pool(), *_qdq("p", "y", "s", "z")], inits)
    assert [s.spec.op for s in build_replica(model).steps].count(FAKE_QUANTIZE) == 2
    _same_as_fused_only(model, monkeypatch)


def test_a_relu_read_twice_stays_before_its_pool(monkeypatch):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        _pool(),
        helper.make_node("ReduceMean", ["a"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Add", ["p", "m"], ["y"]),
    ]
    model = _graph_model(nodes, [])
    assert [s.spec.op for s in build_replica(model).steps][:2] == ["Relu", "MaxPool"]
    _same_as_fused_only(model, monkeypatch)
    alone = _graph_model([helper.make_node("Relu", ["x"], ["a"]), _pool()], [], outputs=("p",))
    assert [s.spec.op for s in build_replica(alone).steps] == ["MaxPool", "Relu"]
    _same_as_fused_only(alone, monkeypatch)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [s.spec.op for s in build_replica(model).steps]


@pytest.mark.parametrize(
    ("between", "why"),
    [
        (helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2]), "averages"),
        (
            helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], dilations=[4, 4]),
            "a dilated window may hold padding only",
        ),
        (
            helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], pads=[0, 0, 2, 2]),
            "a window may hold padding only",
        ),
    ],
)
def test_requantization_after_a_non_selecting_op_is_kept(between, why, monkeypatch):
    inits = [_const("s", 0.1, np.float32), _const("z", 128, np.uint8)]
    nodes = [*_qdq("x", "a", "s", "z"), between, *_qdq("p", "r", "s", "z")]
    model = _graph_model([*nodes, helper.make_node("Relu", ["r"], ["y"])], inits)
    assert _ops(model).count(FAKE_QUANTIZE) == 2, why
    _same_as_fused_only(model, monkeypatch)


def test_requantization_that_could_overflow_is_kept(monkeypatch):
    """A scale so large that a code times it overflows float32: the repeat is not an identity."""
    inits = [_const("s", 9.7e37, np.float32), _const("z", 0, np.int8)]
    nodes = [*_qdq("x", "a", "s", "z"), _pool(), *_qdq("p", "r", "s", "z")]
    model = _graph_model([*nodes, helper.make_node("Relu", ["r"], ["y"])], inits)
    assert _ops(model).count(FAKE_QUANTIZE) == 2
    _same_as_fused_only(model, monkeypatch, torch.full((2, 2, 6, 6), 3.5 * 9.7e37))


def test_nan_codes_get_no_gradient_wherever_they_sit(monkeypatch):
    """The fused backward kernel compares in vector lanes and a scalar tail; NaN must count as
    clamped in both (as in the unfused pair), whatever its position in memory."""
    inits = [_const("s", 0.1, np.float32), _const("z", 128, np.uint8)]
    nodes = [
        *_qdq("x", "a", "s", "z"),
        helper.make_node("Transpose", ["a"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Flatten", ["t"], ["p"], axis=1),
        *_qdq("p", "y", "s", "z"),
    ]
    model = _graph_model(nodes, inits, shape=(1, 1, 6, 6))
    x = torch.zeros(1, 1, 6, 6)
    nan_at = [0, 17, 33, 35]  # inside the vectorised blocks and in the tail of 36 elements
    x.view(-1)[nan_at] = float("nan")
    for replica in (build_replica(model, rewrites=False), build_replica(model)):
        _, grad = _value_and_grad(replica, x)
        assert grad.view(-1)[nan_at].tolist() == [0.0] * len(nan_at)
        assert grad.view(-1)[1].item() == 1.0
    _same_as_fused_only(model, monkeypatch, x)


def test_relu_stays_before_a_pool_whose_window_may_be_padding_only(monkeypatch):
    pool = helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[2, 2], dilations=[5, 5])
    pool.attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1])])
    model = _graph_model([helper.make_node("Relu", ["x"], ["a"]), pool], [])
    assert _ops(model) == ["Relu", "MaxPool"]
    _same_as_fused_only(model, monkeypatch)


def test_centred_integer_weights_match_node_by_node_with_per_channel_zero_points():
    """Dynamic INT8 graphs: ConvInteger (per-channel weight zero points) and MatMulInteger
    (per-column ones) with their weights centred once must equal node-by-node interpretation
    exactly: both are integer arithmetic."""
    rng = np.random.default_rng(0)
    inits = [
        _const("w", rng.integers(-100, 100, (3, 2, 3, 3)), np.int8),
        _const("wz", [-3, 0, 5], np.int8),
        _const("b", rng.integers(-100, 100, (12, 4)), np.int8),
        _const("bz", [1, -2, 0, 7], np.int8),
        _const("shape", [-1, 12], np.int64),
    ]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], kernel_shape=[3, 3]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("MaxPool", ["accf"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        helper.make_node("DynamicQuantizeLinear", ["flat"], ["fq", "fs", "fz"]),
        helper.make_node("MatMulInteger", ["fq", "b", "fz", "bz"], ["mm"]),
        helper.make_node("Cast", ["mm"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _graph_model(nodes, inits)
    integer = [s for s in build_replica(model).steps if s.spec.op.endswith("Integer")]
    assert len(integer) == 2 and all("::centred::" in s.inputs[1] for s in integer)
    assert all(len(s.inputs) == 3 for s in integer)  # the weight zero point is gone
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    weights = torch.arange(8.0).reshape(2, 4)
    expected = _value_and_grad(build_replica(model, rewrites=False), x, weights)
    got = _value_and_grad(build_replica(model), x, weights)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert got[1].abs().sum() > 0


def test_fake_quant_under_vmap_matches_the_eager_path():
    """Per-sample dynamic quantization runs the replica under ``vmap``, where the fake-quant
    takes its transform-safe form; elsewhere the eager form. Same values, same gradients,
    NaN and clamped codes included."""
    spec = NodeSpec(FAKE_QUANTIZE, "fq", 13, {"_qrange": (0, 255)})
    scale, zero_point = torch.tensor(0.05), torch.tensor(128, dtype=torch.uint8)
    x = torch.randn(4, 3, 40, generator=torch.Generator().manual_seed(0)) * 8
    x[1, 2, 7] = float("nan")
    weights = torch.randn(4, 3, 40, generator=torch.Generator().manual_seed(1))

    def one(sample: torch.Tensor) -> torch.Tensor:
        return fake_quantize(spec, [sample, scale, zero_point], torch.float32)[0]

    eager = _value_and_grad(one, x, weights)
    _assert_bit_identical(eager, _value_and_grad(torch.func.vmap(one), x, weights))
    grad = eager[1]
    assert grad[1, 2, 7] == 0 and (grad == 0).any() and (grad != 0).any()
