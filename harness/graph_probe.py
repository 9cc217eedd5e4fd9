"""Find and expose the tensors a defense asks for, in any precision's ONNX graph.

FP32, dynamically quantized (ConvInteger/MatMulInteger) and QDQ (int8 / int4 weight) graphs name
and shape their intermediate tensors differently. This module discovers, by graph structure
rather than by names, the two tensors backdoor defenses use:

- ``penultimate``: the float input of the classifier's last linear layer (AC and SS cluster it);
- ``last_conv``: the last 4-D feature map, the one entering global pooling (Fine-Pruning ranks and
  masks its channels).

It also rewrites graphs so those tensors can be read out (:func:`add_probe_outputs`) or have
channels zeroed (:func:`mask_channels`) while keeping the deployed integer arithmetic intact: in a
QDQ graph the probe reads the *quantized* tensor feeding a DequantizeLinear and dequantizes it in
numpy, because exposing the float DQ output would stop onnxruntime from fusing the following
quantized op and would change the very arithmetic under audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from harness.errors import ModelError

LINEAR_OPS = {"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"}
CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
GLOBAL_POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Flatten"}
QUANTIZE_OPS = {"QuantizeLinear", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class ProbePoint:
    """How to read one float activation out of a graph.

    ``tensor`` is the graph tensor to expose. When ``scale``/``zero_point`` are set the tensor is
    quantized and the float activation is ``(q - zero_point) * scale`` (per-tensor QDQ).
    ``float_name`` is the float tensor the activation stands for (used for masking).
    """

    layer: str
    float_name: str
    tensor: str
    scale: float | None = None
    zero_point: int | None = None

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Return the activation as float32, dequantizing if it was read in quantized form."""
        if self.scale is None:
            return raw.astype(np.float32, copy=False)
        return ((raw.astype(np.int32) - int(self.zero_point or 0)) * np.float32(self.scale)).astype(
            np.float32
        )


class GraphIndex:
    """Producer/consumer maps and initializer lookup over one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.graph_outputs = [o.name for o in self.graph.output]

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer (or Constant node output), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def is_data(self, name: str) -> bool:
        """True for tensors computed from the input (not weights or constants)."""
        return bool(name) and self.constant(name) is None


def _float_source(index: GraphIndex, name: str) -> str:
    """Walk back through quantize ops to the float tensor they quantize."""
    node = index.producer.get(name)
    while node is not None and node.op_type in QUANTIZE_OPS:
        name = node.input[0]
        node = index.producer.get(name)
    return name


def _probe_for(index: GraphIndex, layer: str, float_name: str) -> ProbePoint:
    """Choose how to read ``float_name``: via its quantized source if a DQ produced it."""
    node = index.producer.get(float_name)
    if node is not None and node.op_type == "DequantizeLinear":
        scale = index.constant(node.input[1])
        zp = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is not None and scale.size == 1 and index.is_data(node.input[0]):
            return ProbePoint(
                layer=layer,
                float_name=float_name,
                tensor=node.input[0],
                scale=float(scale.reshape(())),
                zero_point=int(zp.reshape(())) if zp is not None else 0,
            )
    return ProbePoint(layer=layer, float_name=float_name, tensor=float_name)


def find_penultimate(index: GraphIndex) -> str:
    """Float tensor feeding the last linear layer on the path to the first graph output."""
    seen: set[str] = set()
    frontier = [index.graph_outputs[0]]
    while frontier:
        name = frontier.pop(0)
        if name in seen:
            continue
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            continue
        if node.op_type in LINEAR_OPS:
            data_inputs = [i for i in node.input[:2] if index.is_data(i)]
            if data_inputs:
                return _float_source(index, data_inputs[0])
        frontier.extend(i for i in node.input if index.is_data(i))
    raise ModelError("no linear classifier layer (Gemm/MatMul) found on the path to the logits")


def find_last_conv(index: GraphIndex) -> str:
    """The last 4-D feature map: the input of the last global pooling, or the last conv's output."""
    pooled = [
        n for n in index.graph.node if n.op_type in GLOBAL_POOL_OPS and index.is_data(n.input[0])
    ]
    convs = [n for n in index.graph.node if n.op_type in CONV_OPS]
    if not convs:
        raise ModelError("no convolution found in the graph; last_conv activations are unavailable")
    order = {id(n): i for i, n in enumerate(index.graph.node)}
    last_conv_pos = order[id(convs[-1])]
    after_conv = [n for n in pooled if order[id(n)] > last_conv_pos]
    if after_conv:
        return _float_source(index, after_conv[0].input[0])
    return convs[-1].output[0]


def discover_layers(model: onnx.ModelProto) -> dict[str, ProbePoint]:
    """Probe points for ``penultimate`` and ``last_conv`` (those that exist in the graph)."""
    index = GraphIndex(model)
    found: dict[str, ProbePoint] = {}
    for layer, finder in (("penultimate", find_penultimate), ("last_conv", find_last_conv)):
        try:
            found[layer] = _probe_for(index, layer, finder(index))
        except ModelError:
            continue
    return found


def add_probe_outputs(model: onnx.ModelProto, probes: list[ProbePoint]) -> onnx.ModelProto:
    """Copy of ``model`` with each probe's tensor appended as an extra graph output."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    existing = {o.name for o in probed.graph.output}
    for probe in probes:
        if probe.tensor not in existing:
            probed.graph.output.append(helper.make_empty_tensor_value_info(probe.tensor))
            existing.add(probe.tensor)
    return probed


def mask_channels(
    model: onnx.ModelProto, probe: ProbePoint, keep: np.ndarray
) -> tuple[onnx.ModelProto, ProbePoint]:
    """Zero the channels of ``probe``'s tensor where ``keep`` is False, by graph surgery.

    A ``Mul`` by a 0/1 constant of shape ``[1, C, 1, 1]`` is inserted after the float tensor and
    every consumer is rewired to it. In a QDQ graph the product is re-quantized with the tensor's
    own scale and zero point, so the following quantized op still fuses and the deployed integer
    arithmetic is unchanged apart from the masked channels (0 is exactly representable).
    Returns the new model and the probe point that reads the masked tensor.
    """
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    graph = masked.graph
    index = GraphIndex(masked)
    src = probe.float_name
    mask_name, mul_out = f"{src}__keep", f"{src}__masked"
    keep_arr = np.asarray(keep, dtype=np.float32).reshape(1, -1, 1, 1)
    graph.initializer.append(numpy_helper.from_array(keep_arr, mask_name))
    new_nodes = [helper.make_node("Mul", [src, mask_name], [mul_out], name=f"{src}__mask_mul")]
    out_name = mul_out
    new_probe = ProbePoint(layer=probe.layer, float_name=mul_out, tensor=mul_out)
    if probe.scale is not None:
        dq = index.producer[src]
        q_out, dq_out = f"{src}__masked_q", f"{src}__masked_dq"
        zp_input = dq.input[2] if len(dq.input) > 2 else ""
        new_nodes.append(
            helper.make_node("QuantizeLinear", [mul_out, dq.input[1], zp_input], [q_out])
        )
        new_nodes.append(
            helper.make_node("DequantizeLinear", [q_out, dq.input[1], zp_input], [dq_out])
        )
        out_name = dq_out
        new_probe = ProbePoint(
            layer=probe.layer,
            float_name=dq_out,
            tensor=q_out,
            scale=probe.scale,
            zero_point=probe.zero_point,
        )
    consumers = index.consumers.get(src, [])
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == src:
                node.input[i] = out_name
    for i, out in enumerate(graph.output):
        if out.name == src:
            graph.output[i].name = out_name
    # Insert right after the producer so the node list stays topologically sorted.
    producer = index.producer.get(src)
    pos = list(graph.node).index(producer) + 1 if producer is not None else 0
    for offset, node in enumerate(new_nodes):
        graph.node.insert(pos + offset, node)
    return masked, new_probe
