"""The gradient oracle: a differentiable torch replica of the ONNX graph under audit.

Gradient-based defenses (Neural Cleanse) need gradients of the *deployed* model. The torch
training model would be an FP32 surrogate of an INT8/INT4 artifact, and converters such as
onnx2torch drop the quantized ops, so the replica is built from the very ``ModelProto`` the
runtime adapter evaluates: an interpreter module that holds the graph's constants as buffers
and runs its nodes in topological order with the converters of :mod:`harness.replica.ops`.
Quantize / dequantize / integer ops become fake-quant with straight-through gradients, using the
graph's own scales and zero points, so the forward pass matches onnxruntime (checked by
:meth:`harness.runtime.oracle.GradientOracle.parity`) and the backward pass is the usual STE
gradient.

Custom domains: onnxruntime's QOperator contrib ops (``com.microsoft`` QLinearAdd, QLinearMul,
QLinearAveragePool, QLinearGlobalAveragePool, QLinearConcat, QLinearSigmoid, QLinearLeakyRelu, as
``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes them) are interpreted with
onnxruntime's own integer rounding; any other op of a non-default domain is refused at build time.

Rewrites (:mod:`harness.replica.rewrites`): each activation QuantizeLinear → DequantizeLinear
pair with one constant scale and zero point runs as one fused fake-quant, a re-quantization with
the same parameters after a value-selecting op (MaxPool, Flatten) is dropped, and Relu → MaxPool
runs as MaxPool → Relu. Each leaves every value and gradient bit-identical and only saves time.

Output quantizer: when the graph's output is such a pair, :class:`OutputQuantizer` records the
tensor entering it (the logits before quantization) and its parameters, so a caller can see which
logits sit beyond the quantizer's range, where the STE gradient is zero
(:meth:`ReplicaModule.forward_with_pre_quantizer`).

Dynamic quantization: ORT's ``DynamicQuantizeLinear`` takes its scale from the whole batch, and
the adapter therefore runs such graphs one image at a time. With ``dynamic_per_sample=True``
(the default) the replica does the same arithmetic on a batch by running the interpreter under
``torch.func.vmap``: each sample sees the batch-1 graph, so its scale comes from its own values
while the convolutions stay batched. ``False`` reproduces ORT fed the whole batch at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from harness.core.errors import ModelError
from harness.replica.ops import MS, OPS, QUANT_RANGES, NodeSpec
from harness.replica.rewrites import (
    FAKE_QUANTIZE,
    Step,
    centre_constant_weights,
    drop_repeated_quantizers,
    fuse_fake_quant,
    pool_before_relu,
)

DEFAULT_DOMAINS = ("", "ai.onnx")
#: Custom domains whose ops the replica may interpret: only those :data:`OPS` registers under
#: ``"<domain>.<op>"`` (onnxruntime's QOperator contrib ops); any other op there is refused.
CUSTOM_DOMAINS = ("com.microsoft",)
#: Quantizing ops: inputs whose element type gives the output integer type (and so the clamp
#: range), first recorded one wins: the output zero point, then (for onnxruntime's contrib ops,
#: whose output type is the input's type) the input zero point(s) and the quantized input.
QUANT_OUTPUT_ZP: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (2,),
    "QLinearConv": (7,),
    "QLinearMatMul": (7,),
    MS + "QLinearAdd": (7, 2, 5, 0, 3),
    MS + "QLinearMul": (7, 2, 5, 0, 3),
    MS + "QLinearAveragePool": (4, 2, 0),
    MS + "QLinearGlobalAveragePool": (4, 2, 0),
    MS + "QLinearSigmoid": (4, 2, 0),
    MS + "QLinearLeakyRelu": (4, 2, 0),
    MS + "QLinearConcat": (1, 4, 2),
    MS + "QGemm": (8, 2),
}
_NARROW_INTS = {"int4": np.int8, "uint4": np.uint8, "uint16": np.int32, "uint32": np.int64}


@dataclass(frozen=True)
class OutputQuantizer:
    """The QuantizeLinear → DequantizeLinear pair producing the graph's output."""

    input_name: str
    scale: float
    zero_point: float
    qrange: tuple[int, int]

    def saturated_high(self, pre_quantizer: torch.Tensor) -> torch.Tensor:
        """Where a pre-quantizer value quantizes above the top code (clamped: zero STE gradient).

        Computed with the quantizer's own float32 arithmetic, so it agrees with the forward pass.
        """
        scale = torch.tensor(self.scale, dtype=torch.float32)
        code = torch.round(pre_quantizer.detach().float() / scale) + self.zero_point
        return code > self.qrange[1]


class ReplicaModule(nn.Module):
    """Interprets a constant-folded ONNX graph: normalised float NCHW input → first output."""

    def __init__(
        self,
        steps: list[Step],
        constants: dict[str, torch.Tensor],
        input_name: str,
        output_name: str,
        dynamic_per_sample: bool,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.input_name = input_name
        self.output_name = output_name
        self.dynamic_per_sample = dynamic_per_sample
        self.has_dynamic_quant = any(s.spec.op == "DynamicQuantizeLinear" for s in steps)
        self.output_quantizer = _output_quantizer(steps, constants, output_name)
        self._constant_names = list(constants)
        for i, tensor in enumerate(constants.values()):
            self.register_buffer(f"const_{i}", tensor)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._outputs(x, (self.output_name,))[0]

    def forward_with_pre_quantizer(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output and the tensor entering the output quantizer (None without one)."""
        if self.output_quantizer is None:
            return self.forward(x), None
        out, pre = self._outputs(x, (self.output_name, self.output_quantizer.input_name))
        return out, pre

    def _outputs(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        if self.has_dynamic_quant and self.dynamic_per_sample and x.shape[0] > 1:
            return torch.func.vmap(lambda sample: self._run_one(sample, names))(x)
        return self._run(x, names)

    def _run_one(self, sample: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.squeeze(0) for t in self._run(sample.unsqueeze(0), names))

    def _run(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = {
            name: getattr(self, f"const_{i}") for i, name in enumerate(self._constant_names)
        }
        env[self.input_name] = x
        run_steps(self.steps, env, x.dtype)
        return tuple(env[name] for name in names)


def run_steps(steps: list[Step], env: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Execute ``steps`` in order, writing their outputs into ``env``."""
    for step in steps:
        inputs = [env[name] if name else None for name in step.inputs]
        try:
            outputs = (step.convert or OPS[step.spec.op])(step.spec, inputs, dtype)
        except ModelError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(
                f"replica: ONNX op '{step.spec.op}' (node {step.spec.name}) failed: {first}"
            ) from exc
        for name, value in zip(step.outputs, outputs, strict=False):
            if name:
                env[name] = value


def build_replica(
    model: onnx.ModelProto, dynamic_per_sample: bool = True, rewrites: bool = True
) -> ReplicaModule:
    """Differentiable float32 torch module computing ``model``'s first output from its input.

    ``rewrites=False`` interprets every node as it stands (the reference the rewrites are tested
    and benchmarked against; same values and gradients, slower).

    Fails at build time with a one-line :class:`ModelError` on any op or attribute the replica
    cannot reproduce, never by silently computing something else.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
    _refuse_unsupported_ops(graph)
    constants = {
        init.name: _to_torch(numpy_helper.to_array(init), init.name) for init in graph.initializer
    }
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise ModelError(f"replica: expected a graph with one input, found {inputs}")
    input_name, output_name = inputs[0], graph.output[0].name
    types = _elem_types(model)

    steps: list[Step] = []
    for node in _topological(graph, set(constants) | {input_name}):
        key = _op_key(node)
        spec = NodeSpec(key, node.name or node.output[0], opset, _attributes(node, key, types))
        step = Step(spec, tuple(node.input), tuple(node.output))
        if node.op_type == "Constant":
            constants[node.output[0]] = _constant_value(node)
        elif all(name in constants for name in node.input if name):
            with torch.no_grad():  # fold: weight DequantizeLinear, shape arithmetic, ...
                run_steps([step], constants, torch.float32)
        else:
            steps.append(step)

    if rewrites:
        outputs = {o.name for o in graph.output}
        steps = fuse_fake_quant(steps, constants, outputs)
        steps = drop_repeated_quantizers(steps, constants, outputs)
        steps = pool_before_relu(steps, outputs)
        steps = centre_constant_weights(steps, constants)
    _channels_last_conv_weights(steps, constants)
    used = {name for s in steps for name in s.inputs} | {output_name}
    replica = ReplicaModule(
        steps,
        {k: v for k, v in constants.items() if k in used},
        input_name,
        output_name,
        dynamic_per_sample,
    )
    _dry_run(replica, graph.input, input_name)
    return replica


# ---------------------------------------------------------------------------------- build helpers
def _channels_last_conv_weights(steps: list[Step], constants: dict[str, torch.Tensor]) -> None:
    """Store constant 2-D conv weights channels-last, the layout the replica's activations have
    (pixels arrive NHWC): torch would otherwise convert each weight on every call. Values and
    results are unchanged; only the memory layout differs."""
    for step in steps:
        if step.spec.op == "Conv" and len(step.inputs) > 1 and step.inputs[1] in constants:
            weight = constants[step.inputs[1]]
            if weight.ndim == 4 and weight.is_floating_point():
                constants[step.inputs[1]] = weight.contiguous(memory_format=torch.channels_last)


def _output_quantizer(
    steps: list[Step], constants: dict[str, torch.Tensor], output_name: str
) -> OutputQuantizer | None:
    """The fused quantizer writing the graph's output, if that is how the graph ends."""
    last = next((s for s in steps if output_name in s.outputs), None)
    if last is None or last.spec.op != FAKE_QUANTIZE:
        return None
    _, scale, zero_point = last.inputs
    return OutputQuantizer(
        input_name=last.inputs[0],
        scale=float(constants[scale].reshape(())),
        zero_point=float(constants[zero_point].reshape(())),
        qrange=last.spec.attrs["_qrange"],
    )


def _op_key(node: onnx.NodeProto) -> str:
    """The :data:`OPS` key of a node: its op type, qualified by its domain unless default."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _refuse_unsupported_ops(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        key = _op_key(node)
        default = node.domain in DEFAULT_DOMAINS
        if default and (key in OPS or key == "Constant"):
            continue
        if node.domain in CUSTOM_DOMAINS and key in OPS:
            continue
        raise ModelError(f"replica: unsupported ONNX op '{key}' (node {node.name or '?'})")


def _to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    """Initializer → torch tensor; int4/uint4 widen to int8/uint8, halves widen to float32."""
    kind = array.dtype.name
    if kind in _NARROW_INTS:
        array = array.astype(_NARROW_INTS[kind])
    elif kind in ("float16", "bfloat16"):
        array = array.astype(np.float32)
    elif kind == "uint64":
        array = array.astype(np.int64)
    elif array.dtype.kind not in "biuf" or kind.startswith("float8"):
        raise ModelError(f"replica: tensor {name} has unsupported element type {kind}")
    return torch.from_numpy(np.array(array, copy=True))


def _constant_value(node: onnx.NodeProto) -> torch.Tensor:
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return _to_torch(numpy_helper.to_array(value), node.output[0])
        if attr.name in ("value_float", "value_floats"):
            return torch.tensor(value, dtype=torch.float32)
        if attr.name in ("value_int", "value_ints"):
            return torch.tensor(value, dtype=torch.int64)
    raise ModelError(f"replica: Constant node {node.name or node.output[0]} has no numeric value")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor whose type the graph records."""
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        types.setdefault(info.name, info.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _attributes(node: onnx.NodeProto, key: str, types: dict[str, int]) -> dict[str, Any]:
    attrs: dict[str, Any] = {"_n_outputs": sum(1 for name in node.output if name)}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise ModelError(f"replica: node {node.name} ({node.op_type}) has a subgraph")
        value = helper.get_attribute_value(attr)
        attrs[attr.name] = value.decode() if isinstance(value, bytes) else value
    if key in QUANT_OUTPUT_ZP:
        attrs["_qrange"] = _quant_range(node, key, attrs, types)
    return attrs


def _quant_range(
    node: onnx.NodeProto, key: str, attrs: dict[str, Any], types: dict[str, int]
) -> tuple[int, int]:
    """Clamp range of a quantizing node: ``output_dtype``, else the type of its first present
    type-giving input (:data:`QUANT_OUTPUT_ZP`), else uint8 (the ONNX default without one)."""
    names = [node.input[i] for i in QUANT_OUTPUT_ZP[key] if i < len(node.input)]
    present = [name for name in names if name]
    zp = present[0] if present else ""
    elem = int(attrs.get("output_dtype", 0))
    if not elem:
        recorded = [types[name] for name in present if types.get(name, 0)]
        if recorded:
            elem = recorded[0]
        elif not zp:
            elem = onnx.TensorProto.UINT8
    if elem not in QUANT_RANGES:
        kind = onnx.TensorProto.DataType.Name(elem) if elem else f"unknown (zero point {zp!r})"
        raise ModelError(
            f"replica: node {node.name} ({node.op_type}) quantizes to unsupported type {kind}"
        )
    return QUANT_RANGES[elem]


def _topological(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (Kahn), or a clear error."""
    known = set(available)
    waiting = {i: {n for n in node.input if n} - known for i, node in enumerate(graph.node)}
    readers: dict[str, list[int]] = {}
    for i, missing in waiting.items():
        for name in missing:
            readers.setdefault(name, []).append(i)
    ready = deque(i for i, missing in waiting.items() if not missing)
    order: list[onnx.NodeProto] = []
    while ready:
        node = graph.node[ready.popleft()]
        order.append(node)
        for out in node.output:
            for i in readers.pop(out, []):
                waiting[i].discard(out)
                if not waiting[i]:
                    ready.append(i)
    if len(order) != len(graph.node):
        index, missing = next((i, m) for i, m in waiting.items() if m)
        stuck = graph.node[index]
        raise ModelError(
            f"replica: node {stuck.name} ({stuck.op_type}) reads {sorted(missing)}, "
            "which no node produces"
        )
    return order


def _dry_run(replica: ReplicaModule, graph_inputs: Any, input_name: str) -> None:
    """Run one blank sample when the input shape is static, so attribute errors surface now."""
    info = next(i for i in graph_inputs if i.name == input_name)
    dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
    if not dims or any(d <= 0 for d in dims[1:]):
        return
    with torch.no_grad():
        # a graph that fixes its batch (vendor exports: 1 or 16) may hard-code it in Reshapes
        replica(torch.zeros([max(dims[0], 1), *dims[1:]], dtype=torch.float32))
