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

import harness.replica as replica_module
from harness.adapter import RuntimeAdapter
from harness.oracle import PixelReplica
from harness.replica import ReplicaModule, build_replica
from harness.replica_rewrites import FAKE_QUANTIZE
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


def _graph_model(nodes, inits, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "rewrites",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 6, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _pool() -> onnx.NodeProto:
    return helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2])


def _same_as_fused_only(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(3)) * 3
    outs = []
    for replica in (_fused_only(model, monkeypatch), build_replica(model)):
        xi = x.clone().requires_grad_(True)
        y = replica(xi)
        y.sum().backward()
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_requantization_with_other_parameters_is_kept(monkeypatch):
    inits = [
        _const("s1", 0.1, np.float32),
        _const("s2", 0.2, np.float32),
        _const("z", 0, np.uint8),
    ]
    nodes = [*_qdq("x", "a", "s1", "z"), _pool(), *_qdq("p", "y", "s2", "z")]
    model = _graph_model(nodes, inits)
    assert [s.spec.op for s in build_replica(model).steps].count(FAKE_QUANTIZE) == 2
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
