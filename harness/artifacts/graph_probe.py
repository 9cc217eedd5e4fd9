"""Find and expose the tensors a defense asks for, in any precision's ONNX graph.

FP32, dynamically quantized (ConvInteger/MatMulInteger), QDQ (int8 / int4 weight) and QOperator
(QLinearConv, QGemm, QLinearGlobalAveragePool, ...) graphs name and shape their intermediate
tensors differently, and vendor graphs add their own habits (a bias as a separate ``Add``, no
pooling before the classifier). This module discovers, by graph structure rather than by names,
the two tensors backdoor defenses use:

- ``penultimate``: the input of the classifier's last linear layer (AC and SS cluster it);
- ``last_conv``: the last convolution's *activation* — the feature map entering global pooling,
  or, without pooling, the last conv's output followed through its bias, scale and nonlinearity
  (Fine-Pruning ranks and masks its channels). The raw conv output would be the pre-bias,
  pre-ReLU value, or even an int32 accumulator, which is not what Fine-Pruning prunes.

It also rewrites graphs so those tensors can be read out (:func:`add_probe_outputs`) or have
channels zeroed (:func:`mask_channels`) while keeping the deployed integer arithmetic intact:

- QDQ: the probe reads the *quantized* tensor feeding a DequantizeLinear and dequantizes it in
  numpy, because exposing the float DQ output would stop onnxruntime from fusing the following
  quantized op and would change the very arithmetic under audit;
- QOperator and integer accumulators: the activation only exists as an integer tensor, so it is
  read as such and decoded with the scale and zero point of the op that produced it; masking
  writes the zero point (real value 0) into the masked channels, in the integer domain, so the
  QLinear kernels around it run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from harness.core.errors import ModelError

LINEAR_OPS = {
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "QGemm",
    "FusedMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
GLOBAL_POOL_OPS = {
    "GlobalAveragePool",
    "GlobalMaxPool",
    "ReduceMean",
    "ReduceMax",
    "Flatten",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
}
QUANTIZE_OPS = {"QuantizeLinear", "DynamicQuantizeLinear"}
#: Ops that keep a conv activation's shape and channels (per-element, or per-channel with
#: parameter operands): the last conv's output is followed through them to its activation.
ELEMENTWISE_OPS = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "BatchNormalization",
    "Cast",
    "Identity",
    "Relu",
    "Clip",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "ThresholdedRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softplus",
    "Softsign",
    "Mish",
    "Gelu",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearAdd",
    "QLinearMul",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
}
#: Ops that move integer codes around without changing them: a tensor they produce has the
#: quantization parameters of their first input.
PASS_THROUGH_OPS = {
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "MaxPool",
    "Identity",
}
#: Where the output scale and zero point of a quantized op sit among its inputs.
OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4),
}
#: Where a quantized op reads the scale and zero point of a quantized input (input → indices).
INPUT_QPARAMS = {
    "DequantizeLinear": {0: (1, 2)},
    "QLinearConv": {0: (1, 2)},
    "QLinearMatMul": {0: (1, 2), 3: (4, 5)},
    "QGemm": {0: (1, 2)},
    "QLinearAdd": {0: (1, 2), 3: (4, 5)},
    "QLinearMul": {0: (1, 2), 3: (4, 5)},
    "QLinearGlobalAveragePool": {0: (1, 2)},
    "QLinearAveragePool": {0: (1, 2)},
    "QLinearLeakyRelu": {0: (1, 2)},
    "QLinearSigmoid": {0: (1, 2)},
}
#: Integer ops whose output is an int32 accumulator with no scale of its own.
ACCUMULATOR_OPS = {"ConvInteger", "MatMulInteger"}


@dataclass(frozen=True)
class ProbePoint:
    """How to read one float activation out of a graph.

    ``tensor`` is the graph tensor to expose. When ``scale``/``zero_point`` are set the tensor is
    quantized and the float activation is ``(q - zero_point) * scale`` (per-tensor).
    ``float_name`` is the float tensor the activation stands for (used for masking).
    ``integer_dtype`` is set when the activation exists only as an integer tensor (QOperator
    output, int32 accumulator): then ``float_name == tensor`` and masking happens in that integer
    domain.
    """

    layer: str
    float_name: str
    tensor: str
    scale: float | None = None
    zero_point: int | None = None
    integer_dtype: str | None = None

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Return the activation as float32, dequantizing if it was read in quantized form."""
        if self.scale is None:
            return raw.astype(np.float32, copy=False)
        return ((raw.astype(np.int32) - int(self.zero_point or 0)) * np.float32(self.scale)).astype(
            np.float32
        )


@dataclass(frozen=True)
class _QuantParams:
    """Scale / zero-point tensor names of an integer tensor, and its element type."""

    scale: str | None
    zero_point: str | None
    dtype: np.dtype


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
        self._parameters: dict[str, bool] = {}

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

    def is_parameter(self, name: str) -> bool:
        """True for tensors that carry no per-pixel data: constants, tensors computed only from
        constants (a DequantizeLinear of a bias), and the run-time scale / zero point of a
        DynamicQuantizeLinear (the per-batch scale a dynamic conv output is multiplied by)."""
        if name in self._parameters:
            return self._parameters[name]
        self._parameters[name] = False  # guards against (invalid) cycles
        node = self.producer.get(name)
        if self.constant(name) is not None:
            result = True
        elif node is None:
            result = False
        elif node.op_type == "DynamicQuantizeLinear":
            result = name != node.output[0]
        else:
            result = all(self.is_parameter(i) for i in node.input if i)
        self._parameters[name] = result
        return result


def _float_source(index: GraphIndex, name: str) -> str:
    """Walk back through quantize ops to the float tensor they quantize."""
    node = index.producer.get(name)
    while node is not None and node.op_type in QUANTIZE_OPS:
        name = node.input[0]
        node = index.producer.get(name)
    return name


def _input(node: onnx.NodeProto, position: int) -> str | None:
    return node.input[position] if len(node.input) > position and node.input[position] else None


def _quant_params(index: GraphIndex, name: str) -> _QuantParams | None:
    """The quantization of an integer tensor, found from the op that wrote it (through ops that
    only move codes around) or, failing that, from a QLinear op that reads it; None for float."""
    node = index.producer.get(name)
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        node = index.producer.get(node.input[0])
    if node is not None and node.op_type in ACCUMULATOR_OPS:
        return _QuantParams(None, None, np.dtype(np.int32))
    if node is not None and node.op_type in OUTPUT_QPARAMS:
        scale_at, zp_at = OUTPUT_QPARAMS[node.op_type]
        params = _params_at(index, node, scale_at, zp_at)
        if params is not None:
            return params
    for consumer in index.consumers.get(name, []):
        positions = INPUT_QPARAMS.get(consumer.op_type, {})
        for position, (scale_at, zp_at) in positions.items():
            if _input(consumer, position) == name:
                return _params_at(index, consumer, scale_at, zp_at)
    return None


def _params_at(
    index: GraphIndex, node: onnx.NodeProto, scale_at: int, zp_at: int
) -> _QuantParams | None:
    """Scale and zero point at the given inputs of ``node``; None when it has no output scale
    (a QGemm without ``y_scale`` writes float)."""
    scale = _input(node, scale_at)
    if scale is None:
        return None
    zero_point = _input(node, zp_at)
    zp_value = index.constant(zero_point) if zero_point else None
    # ONNX's default zero point is a uint8 zero.
    dtype = zp_value.dtype if zp_value is not None else np.dtype(np.uint8)
    return _QuantParams(scale, zero_point, dtype)


def _probe_for(index: GraphIndex, layer: str, float_name: str) -> ProbePoint:
    """Choose how to read ``float_name``: via its quantized source if a DQ produced it, in its
    own integer form if it is an integer tensor, else as it is."""
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
    params = _quant_params(index, float_name)
    if params is None:
        return ProbePoint(layer=layer, float_name=float_name, tensor=float_name)
    return _integer_probe(index, layer, float_name, params)


def _integer_probe(index: GraphIndex, layer: str, name: str, params: _QuantParams) -> ProbePoint:
    """Probe point reading an integer tensor, decoded with its per-tensor scale and zero point."""
    if params.scale is None:  # int32 accumulator: no static scale exists
        return ProbePoint(layer, name, name, integer_dtype=params.dtype.name)
    scale = index.constant(params.scale)
    zero_point = index.constant(params.zero_point) if params.zero_point else None
    if scale is None or scale.size != 1 or (zero_point is not None and zero_point.size != 1):
        raise ModelError(f"{layer} tensor '{name}' has no constant per-tensor quantization")
    return ProbePoint(
        layer=layer,
        float_name=name,
        tensor=name,
        scale=float(scale.reshape(())),
        zero_point=int(zero_point.reshape(())) if zero_point is not None else 0,
        integer_dtype=params.dtype.name,
    )


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
    """The last conv's activation: the input of the last global pooling after it, else its
    output followed through bias, scale, re-quantization and nonlinearity."""
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
    return follow_activation(index, convs[-1].output[0])


def follow_activation(index: GraphIndex, name: str) -> str:
    """Follow ``name`` forward through elementwise ops whose other operands are parameters,
    as long as it is the op's only reader: the tensor reached is the layer's activation."""
    while name not in index.graph_outputs:
        readers = index.consumers.get(name, [])
        if len(readers) != 1:
            break
        node = readers[0]
        others = [i for i in node.input if i and i != name]
        if node.op_type not in ELEMENTWISE_OPS or not all(index.is_parameter(i) for i in others):
            break
        name = node.output[0]
    return name


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

    Float tensor: a ``Mul`` by a 0/1 constant of shape ``[1, C, 1, 1]`` is inserted after it and
    every consumer is rewired to it. In a QDQ graph the product is re-quantized with the tensor's
    own scale and zero point, so the following quantized op still fuses and the deployed integer
    arithmetic is unchanged apart from the masked channels (0 is exactly representable).
    Integer tensor (QOperator, accumulator): a ``Where`` writes the zero point (real value 0;
    0 for an accumulator) into the masked channels and passes every other code through as is.
    Returns the new model and the probe point that reads the masked tensor.
    """
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    index = GraphIndex(masked)
    src = probe.float_name
    if probe.integer_dtype is not None:
        new_nodes, out_name, new_probe = _integer_mask(masked.graph, probe, keep)
    else:
        new_nodes, out_name, new_probe = _float_mask(masked.graph, index, probe, keep)
    for node in index.consumers.get(src, []):
        for i, name in enumerate(node.input):
            if name == src:
                node.input[i] = out_name
    for out in masked.graph.output:
        if out.name == src:
            out.name = out_name
    # Insert right after the producer so the node list stays topologically sorted.
    producer = index.producer.get(src)
    pos = list(masked.graph.node).index(producer) + 1 if producer is not None else 0
    for offset, node in enumerate(new_nodes):
        masked.graph.node.insert(pos + offset, node)
    return masked, new_probe


def _float_mask(
    graph: onnx.GraphProto, index: GraphIndex, probe: ProbePoint, keep: np.ndarray
) -> tuple[list[onnx.NodeProto], str, ProbePoint]:
    """``Mul`` by the 0/1 mask (then Q/DQ again in a QDQ graph); nodes, output, new probe."""
    src = probe.float_name
    mask_name, mul_out = f"{src}__keep", f"{src}__masked"
    keep_arr = np.asarray(keep, dtype=np.float32).reshape(1, -1, 1, 1)
    graph.initializer.append(numpy_helper.from_array(keep_arr, mask_name))
    nodes = [helper.make_node("Mul", [src, mask_name], [mul_out], name=f"{src}__mask_mul")]
    if probe.scale is None:
        return nodes, mul_out, ProbePoint(layer=probe.layer, float_name=mul_out, tensor=mul_out)
    dq = index.producer[src]
    q_out, dq_out = f"{src}__masked_q", f"{src}__masked_dq"
    zp_input = dq.input[2] if len(dq.input) > 2 else ""
    nodes.append(helper.make_node("QuantizeLinear", [mul_out, dq.input[1], zp_input], [q_out]))
    nodes.append(helper.make_node("DequantizeLinear", [q_out, dq.input[1], zp_input], [dq_out]))
    new_probe = ProbePoint(
        layer=probe.layer,
        float_name=dq_out,
        tensor=q_out,
        scale=probe.scale,
        zero_point=probe.zero_point,
    )
    return nodes, dq_out, new_probe


def _integer_mask(
    graph: onnx.GraphProto, probe: ProbePoint, keep: np.ndarray
) -> tuple[list[onnx.NodeProto], str, ProbePoint]:
    """``Where(keep, q, zero_point)`` on an integer tensor; nodes, output, new probe."""
    src = probe.tensor
    mask_name, fill_name, out_name = f"{src}__keep", f"{src}__fill", f"{src}__masked"
    keep_arr = np.asarray(keep, dtype=bool).reshape(1, -1, 1, 1)
    fill = np.array(probe.zero_point or 0, dtype=np.dtype(probe.integer_dtype))
    graph.initializer.append(numpy_helper.from_array(keep_arr, mask_name))
    graph.initializer.append(numpy_helper.from_array(fill, fill_name))
    node = helper.make_node(
        "Where", [mask_name, src, fill_name], [out_name], name=f"{src}__mask_where"
    )
    new_probe = ProbePoint(
        layer=probe.layer,
        float_name=out_name,
        tensor=out_name,
        scale=probe.scale,
        zero_point=probe.zero_point,
        integer_dtype=probe.integer_dtype,
    )
    return [node], out_name, new_probe
