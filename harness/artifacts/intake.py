"""Intake: a vendor's ONNX image classifier, as published, turned into the harness's contract.

Everything downstream (adapter, graph probes, replica, quantizers, defenses) assumes one graph
shape: a single float32 image input with a known layout and preprocessing, and a first output of
per-class *logits* shaped N×C. Vendors publish every variation of that: weights listed as graph
inputs (IR 3 / CNTK), NHWC inputs, a Softmax or LogSoftmax at the end, N×C×1×1 convolutional
heads, preprocessing folded into the graph or described only in a README. Rather than teaching
every defense about each variation, this step rewrites a *copy* of the graph once, at the door,
and records every change in plain words, so an audit report can say exactly what was audited.
The caller's proto (and so the vendor's file) is never touched.

What cannot be fixed safely is refused with one line naming the problem and the flag that
resolves it: an output that is not per-class scores, a second real input, a layout that cannot be
told from the shape, preprocessing nobody stated.

Deliberately left alone: a fixed batch dimension. Reshape constants further down often hard-code
it, so rewriting the input would break the graph in ways no check here could see; it is reported
as ``fixed_batch`` so the adapter can chunk and pad to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from harness.artifacts.graph_probe import GraphIndex
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.core.errors import ModelError, validation_message

Dim = int | str | None  # a static size, a symbolic name, or unknown
Shape = tuple[Dim, ...]

#: Ops that only rearrange a tensor's elements, so logits may pass through them unchanged.
SHAPE_ONLY_OPS = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
#: Ops that, applied to a Softmax's output with constants, still leave probabilities behind.
ELEMENTWISE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Cast", "Clip", "Log", "Pow", "Sqrt"})
#: The harness's pixels are grey or RGB.
IMAGE_CHANNELS = (1, 3)
CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}
#: IR 4 is the first ONNX IR that lets an initializer stay out of graph.input.
IR_WITH_PRIVATE_INITIALIZERS = 4
#: Softmax's default axis and semantics changed in opset 13 (one axis instead of a 2-D coercion).
SOFTMAX_SINGLE_AXIS_OPSET = 13
#: Unsqueeze takes its axes as an input (not an attribute) from this opset on.
UNSQUEEZE_AXES_INPUT_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")
FLAGS_HINT = "pass --mean and --std (and --scale, --layout, --channel-order where they differ)"


class IntakeOverrides(BaseModel):
    """What an auditor states about a model on the command line; every field is optional.

    Construction raises a one-line :class:`ModelError` (not pydantic's multi-line error), so a
    NaN or a typo in a flag reads like every other user error.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    scale: PositiveFloat | None = None
    mean: tuple[float, ...] | None = Field(None, min_length=1)
    std: tuple[PositiveFloat, ...] | None = Field(None, min_length=1)
    layout: Literal["NCHW", "NHWC"] | None = None
    channel_order: Literal["RGB", "BGR"] | None = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            fields = type(self).model_fields
            raise ModelError(validation_message(exc, "intake option", fields)) from exc


@dataclass(frozen=True)
class IntakeResult:
    """The contract model and everything the harness needs to know to query it."""

    model: onnx.ModelProto
    preprocessing: Preprocessing
    input_name: str
    output_name: str
    layout: str
    fixed_batch: int | None  # the declared batch size the graph only accepts; None if symbolic
    num_classes: int | None  # None when the output width is symbolic
    outputs_are_probabilities: bool
    changes: tuple[str, ...]
    opset: int
    probabilities_reason: str | None = None  # why a final Softmax had to stay, when it did


def intake(model: onnx.ModelProto, overrides: IntakeOverrides | None = None) -> IntakeResult:
    """Turn ``model`` into the harness's contract on a copy, recording each change made."""
    overrides = overrides or IntakeOverrides()
    contract = onnx.ModelProto()
    contract.CopyFrom(model)
    changes: list[str] = []
    opset = _default_opset(contract)
    image = _single_image_input(contract, changes)
    stored = _stored_preprocessing(contract)
    requested_layout = overrides.layout or (stored.layout if stored else None)
    shape = _image_shape(image)
    layout, channels = _resolve_layout(image.name, shape, requested_layout)
    preprocessing = _resolve_preprocessing(image.name, stored, overrides, layout, channels)
    head = _contract_output(contract, opset, shape[0] if shape else None, changes)
    _prune_unused(contract.graph, changes)
    if stored != preprocessing:
        _set_metadata(contract, METADATA_KEY, preprocessing.to_json())
        changes.append(f"stored the preprocessing in the model metadata '{METADATA_KEY}'")
    return IntakeResult(
        model=contract,
        preprocessing=preprocessing,
        input_name=image.name,
        output_name=head.name,
        layout=layout,
        fixed_batch=_fixed_batch(shape),
        num_classes=head.classes if isinstance(head.classes, int) else None,
        outputs_are_probabilities=head.probabilities_reason is not None,
        changes=tuple(changes),
        opset=opset,
        probabilities_reason=head.probabilities_reason,
    )


def check_num_classes(result: IntakeResult, dataset_classes: int) -> None:
    """Refuse to audit a model on a dataset with a different number of classes.

    A 100-class model on a 10-class dataset would still "predict": accuracy and attack success
    would be computed against the wrong label space and look like a finding. A symbolic output
    width cannot be checked here (the adapter's ``num_classes`` probes it on a blank image).
    """
    if result.num_classes is not None and result.num_classes != dataset_classes:
        raise ModelError(
            f"the model outputs {result.num_classes} class scores but the dataset has "
            f"{dataset_classes} classes; audit it on data with the classes it was trained on"
        )


# ---------------------------------------------------------------------------- input side
def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise ModelError("the model imports no default-domain ONNX opset")


def _single_image_input(model: onnx.ModelProto, changes: list[str]) -> onnx.ValueInfoProto:
    """The one real input, after dropping initializers that older exporters also list as inputs.

    Listed initializers are overridable inputs under IR >= 4, which stops onnxruntime from
    treating weights as constants (no folding, and quantizers skip them).
    """
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    listed = [value.name for value in graph.input if value.name in weights]
    if listed:
        real = [value for value in graph.input if value.name not in weights]
        del graph.input[:]
        graph.input.extend(real)
        changes.append(
            f"dropped {len(listed)} initializer(s) also listed as graph inputs (IR-3 style), "
            f"so weights are constants: {_some(listed)}"
        )
        if model.ir_version < IR_WITH_PRIVATE_INITIALIZERS:
            changes.append(
                f"raised ir_version {model.ir_version} to {IR_WITH_PRIVATE_INITIALIZERS}, the "
                "first that allows initializers outside graph.input"
            )
            model.ir_version = IR_WITH_PRIVATE_INITIALIZERS
    if len(graph.input) != 1:
        names = [value.name for value in graph.input]
        raise ModelError(
            f"expected one image input, found {len(names)}: {names}; blindspots audits "
            "single-input image classifiers"
        )
    image = graph.input[0]
    elem_type = image.type.tensor_type.elem_type  # 0 (UNDEFINED) for a non-tensor input
    if elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(elem_type) if elem_type else "a non-tensor value"
        raise ModelError(f"input '{image.name}' takes {kind}; the harness feeds float32 images")
    return image


def _image_shape(image: onnx.ValueInfoProto) -> Shape | None:
    """The input's declared shape; refuses ranks that cannot be an image batch."""
    shape = _dims(image.type.tensor_type)
    if shape is not None and len(shape) != 4:
        raise ModelError(
            f"input '{image.name}' shaped {_fmt(shape)} is not a rank-4 image batch "
            "(NCHW or NHWC); blindspots audits image classifiers"
        )
    return shape


def _resolve_layout(
    name: str, shape: Shape | None, requested: str | None
) -> tuple[str, int | None]:
    """Layout and static channel count: as requested, else where the shape allows one reading.

    Only 1 or 3 channels count as image channels, so [N, 3, 224, 224] is NCHW and [N, 8, 8, 1]
    NHWC, while [N, 3, 8, 3] or an all-symbolic shape needs the auditor to say.
    """
    if shape is None:
        if requested is None:
            raise ModelError(
                f"input '{name}' declares no shape, so its layout is unknown; "
                "pass --layout NCHW or --layout NHWC"
            )
        return requested, None
    if requested is None:
        fitting = [lay for lay, axis in CHANNEL_AXIS.items() if shape[axis] in IMAGE_CHANNELS]
        if len(fitting) != 1:
            raise ModelError(
                f"cannot tell whether input '{name}' shaped {_fmt(shape)} is NCHW or NHWC; "
                "pass --layout NCHW or --layout NHWC"
            )
        requested = fitting[0]
    channels = shape[CHANNEL_AXIS[requested]]
    if isinstance(channels, int) and channels not in IMAGE_CHANNELS:
        raise ModelError(
            f"as {requested}, input '{name}' shaped {_fmt(shape)} takes {channels} channels; "
            "the harness feeds 1 (grey) or 3 (RGB) channel images"
        )
    return requested, channels if isinstance(channels, int) else None


def _fixed_batch(shape: Shape | None) -> int | None:
    batch = shape[0] if shape else None
    return batch if isinstance(batch, int) and batch > 0 else None


# ---------------------------------------------------------------------------- preprocessing
def _stored_preprocessing(model: onnx.ModelProto) -> Preprocessing | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return Preprocessing.from_json(prop.value)
    return None


def _resolve_preprocessing(
    name: str,
    stored: Preprocessing | None,
    overrides: IntakeOverrides,
    layout: str,
    channels: int | None,
) -> Preprocessing:
    """Flags over stored metadata; without metadata, mean and std must be stated.

    Guessing normalisation constants would make a perfectly good model look broken (or a
    broken one look backdoored), so nothing beyond the documented defaults (scale 1/255, RGB)
    is assumed.
    """
    flags = overrides.model_dump(exclude_none=True)
    if stored is None and not {"mean", "std"} <= flags.keys():
        raise ModelError(
            f"the model carries no '{METADATA_KEY}' metadata, so its preprocessing is unknown; "
            f"{FLAGS_HINT}"
        )
    base = asdict(stored) if stored is not None else {}
    preprocessing = Preprocessing(**{**base, **flags, "layout": layout})
    if channels is not None and preprocessing.channels != channels:
        raise ModelError(
            f"input '{name}' takes {channels} channel(s) but the preprocessing has "
            f"{preprocessing.channels} (mean {list(preprocessing.mean)}); give one --mean and "
            "--std value per channel"
        )
    if preprocessing.channels not in IMAGE_CHANNELS:
        raise ModelError(
            f"the preprocessing describes {preprocessing.channels} channels; the harness feeds "
            "1 (grey) or 3 (RGB) channel images"
        )
    return preprocessing


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


# ---------------------------------------------------------------------------- output side
@dataclass(frozen=True)
class _Head:
    """The contract's output: its tensor name, class width, and why it is not logits (if not)."""

    name: str
    classes: Dim
    probabilities_reason: str | None


def _contract_output(model: onnx.ModelProto, opset: int, batch: Dim, changes: list[str]) -> _Head:
    """Make ``graph.output`` a single N×C tensor of logits (or probabilities, if unavoidable).

    A rewritten output declares the input's batch dimension: it is the same batch, and shape
    inference would otherwise name it ``unk__0``.
    """
    graph = model.graph
    if not graph.output:
        raise ModelError("the model declares no outputs; expected class scores shaped N×C")
    values = _value_infos(model)
    first = graph.output[0].name
    batch_one = batch == 1
    shape = _shape_of(values, first)
    class_axis = _class_axis(first, shape, batch_one)
    logits, reason = _strip_final_softmax(
        GraphIndex(model), values, first, opset, changes, batch_one
    )
    if logits != first:
        shape = _shape_of(values, logits)
        class_axis = _class_axis(logits, shape, batch_one)
    name = logits
    if len(shape) == 1:
        name = _append_batch_axis(graph, logits, opset)
        changes.append(
            f"output '{logits}' shaped {_fmt(shape)} of a batch-1 graph read as class scores: "
            "added the batch axis (1×C)"
        )
    elif len(shape) > 2:
        name = _append_flatten(graph, logits)
        changes.append(f"flattened output '{logits}' shaped {_fmt(shape)} to N×C")
    if len(graph.output) > 1:
        extra = [value.name for value in graph.output[1:]]
        changes.append(f"dropped extra output(s) {_some(extra)}: the contract has one output")
    if name != first or len(graph.output) > 1:
        elem_type = values[logits].type.tensor_type.elem_type or TensorProto.FLOAT
        contract_shape = [batch, shape[class_axis]]
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(name, elem_type, contract_shape))
    return _Head(name=name, classes=shape[class_axis], probabilities_reason=reason)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's type and shape, inferred where the file does not declare them.

    Inference runs on a throwaway copy (the contract keeps its own value_info as published);
    ``data_prop`` follows Shape→Gather→Concat chains that feed Reshape. A model onnx cannot infer
    (custom ops, say) still yields its declared shapes.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises InferenceError, ValidationError, RuntimeError, ...
        inferred = model
    graph = inferred.graph
    values = {value.name: value for value in graph.value_info}
    values.update((value.name, value) for value in graph.input)
    for value in model.graph.output:  # declared first, inferred where it knows more
        values[value.name] = value
    for value in graph.output:
        if value.type.tensor_type.HasField("shape"):
            values[value.name] = value
    return values


def _shape_of(values: dict[str, onnx.ValueInfoProto], name: str) -> Shape:
    value = values.get(name)
    shape = _dims(value.type.tensor_type) if value is not None else None
    if shape is None:
        raise ModelError(
            f"cannot determine the shape of output '{name}'; expected class scores shaped N×C"
        )
    return shape


def _class_axis(name: str, shape: Shape, batch_one: bool = False) -> int:
    """Axis of the class scores: the only non-batch axis not statically 1 (N×C, N×C×1×1, ...).

    ``batch_one``: the graph takes exactly one image (a fixed batch of 1), so a rank-1 output
    ``[C]`` is that image's class scores with the batch axis squeezed away — vendors export
    batch-1 models that way, and refusing them would refuse good files.
    """
    if batch_one and len(shape) == 1 and shape[0] != 1:
        return 0
    wide = [axis for axis, dim in enumerate(shape) if axis > 0 and dim != 1]
    if len(shape) < 2 or len(wide) != 1:
        raise ModelError(
            f"output '{name}' shaped {_fmt(shape)} is not class scores; expected N×C (or N×C×1×1)"
        )
    return wide[0]


def _strip_final_softmax(
    index: GraphIndex,
    values: dict[str, onnx.ValueInfoProto],
    output: str,
    opset: int,
    changes: list[str],
    batch_one: bool = False,
) -> tuple[str, str | None]:
    """The logits behind a final (Log)Softmax, or the output itself with a reason if it stays.

    Only shape-only ops may follow the Softmax: they preserve each sample's scores in order, so
    the Softmax's input flattened to N×C has exactly the softmax the vendor's output had.
    """
    node = _producer_behind(index, output, SHAPE_ONLY_OPS)
    if node is None or node.domain not in DEFAULT_DOMAINS:
        return output, None
    if node.op_type not in SOFTMAX_OPS:
        return output, _softmax_behind_arithmetic(index, node)
    logits = node.input[0]
    problem = _softmax_axis_problem(node, values, logits, opset, batch_one)
    if problem is not None:
        return output, f"the final {node.op_type} cannot be removed: {problem}"
    changes.append(
        f"removed final {node.op_type}: defenses work on logits (now read from '{logits}')"
    )
    return logits, None


def _producer_behind(index: GraphIndex, name: str, skip: frozenset[str]) -> onnx.NodeProto | None:
    """The node producing ``name``, looking back through ops in ``skip`` along their data input."""
    node = index.producer.get(name)
    while node is not None and node.op_type in skip:
        source = _data_input(index, node)
        if source is None:
            return node
        node = index.producer.get(source)
    return node


def _data_input(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The tensor a pass-through op carries forward (a Reshape's shape may itself be computed)."""
    if node.op_type in SHAPE_ONLY_OPS:
        return node.input[0]
    data = [name for name in node.input if index.is_data(name)]
    return data[0] if len(data) == 1 else None


def _softmax_behind_arithmetic(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why the output is probabilities, if a Softmax feeds it through elementwise arithmetic."""
    if node.op_type not in ELEMENTWISE_OPS:
        return None
    source = _producer_behind(index, node.output[0], SHAPE_ONLY_OPS | ELEMENTWISE_OPS)
    if source is not None and source.op_type in SOFTMAX_OPS:
        return (
            f"the output is a {source.op_type} followed by {node.op_type}, which cannot be "
            "removed without changing the scores"
        )
    return None


def _softmax_axis_problem(
    node: onnx.NodeProto,
    values: dict[str, onnx.ValueInfoProto],
    logits: str,
    opset: int,
    batch_one: bool = False,
) -> str | None:
    """None if the (Log)Softmax normalises over the class axis alone, else what is wrong.

    Before opset 13 it normalises the input coerced to 2-D at ``axis`` (default 1); from 13 on
    it normalises over the single ``axis`` (default -1).
    """
    value = values.get(logits)
    shape = _dims(value.type.tensor_type) if value is not None else None
    if shape is None:
        return f"the shape of its input '{logits}' is unknown"
    try:
        class_axis = _class_axis(logits, shape, batch_one)
    except ModelError:
        return f"its input '{logits}' shaped {_fmt(shape)} is not class scores"
    single = opset >= SOFTMAX_SINGLE_AXIS_OPSET
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if single else 1)
    axis = axis + len(shape) if axis < 0 else axis
    reduced = [axis] if single else list(range(axis, len(shape)))
    if class_axis not in reduced or any(shape[a] != 1 for a in reduced if a != class_axis):
        return f"it normalises axis {axis} of {_fmt(shape)}, not the class axis alone"
    return None


def _append_flatten(graph: onnx.GraphProto, name: str) -> str:
    flat = _fresh_name(graph, f"{name}_flat")
    graph.node.append(helper.make_node("Flatten", [name], [flat], name=flat, axis=1))
    return flat


def _append_batch_axis(graph: onnx.GraphProto, name: str, opset: int) -> str:
    """``[C]`` → ``[1, C]`` with an Unsqueeze (axes an input from opset 13, an attribute before)."""
    batched = _fresh_name(graph, f"{name}_batched")
    if opset >= UNSQUEEZE_AXES_INPUT_OPSET:
        axes = _fresh_name(graph, f"{name}_batch_axis")
        graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
        graph.node.append(helper.make_node("Unsqueeze", [name, axes], [batched], name=batched))
    else:
        graph.node.append(helper.make_node("Unsqueeze", [name], [batched], name=batched, axes=[0]))
    return batched


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {out for node in graph.node for out in node.output} | {
        value.name for value in [*graph.input, *graph.initializer]
    }
    candidate, suffix = base, 0
    while candidate in taken:
        suffix += 1
        candidate = f"{base}_{suffix}"
    return candidate


# ---------------------------------------------------------------------------- clean-up
def _prune_unused(graph: onnx.GraphProto, changes: list[str]) -> None:
    """Drop nodes and initializers that no longer feed the output (a stripped Softmax, say).

    Nodes are topologically sorted in ONNX, so one backward pass finds everything needed;
    subgraphs (If/Loop bodies) count every name they mention, since they may read outer tensors.
    """
    needed = {value.name for value in graph.output}
    live: set[int] = set()
    for position in range(len(graph.node) - 1, -1, -1):
        node = graph.node[position]
        if any(out in needed for out in node.output):
            live.add(position)
            needed.update(node.input)
            needed.update(_subgraph_names(node))
    removed = [node.op_type for i, node in enumerate(graph.node) if i not in live]
    unused = [init.name for init in graph.initializer if init.name not in needed]
    if removed:
        kept = [_copy(node) for i, node in enumerate(graph.node) if i in live]
        del graph.node[:]
        graph.node.extend(kept)
    if unused:
        initializers = [_copy(init) for init in graph.initializer if init.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    if removed:
        changes.append(
            f"removed {len(removed)} node(s) that no longer feed the output: {_some(removed)}"
        )
    if unused:
        changes.append(f"removed {len(unused)} initializer(s) that no longer feed the output")
    alive = needed | {out for node in graph.node for out in node.output}
    outputs = {value.name for value in graph.output}
    value_info = [_copy(v) for v in graph.value_info if v.name in alive and v.name not in outputs]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _subgraph_names(node: onnx.NodeProto) -> Iterator[str]:
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in sub.node:
                yield from inner.input
                yield from _subgraph_names(inner)


def _copy(message: Any) -> Any:
    """A detached copy: protobuf repeated fields invalidate elements once they are cleared."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


# ---------------------------------------------------------------------------- formatting
def _dims(tensor_type: onnx.TypeProto.Tensor) -> Shape | None:
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in tensor_type.shape.dim
    )


def _fmt(shape: Shape) -> str:
    """``[N, 10, 1, 1]``; unknown dims (and the ``unk__`` names shape inference makes up) as ?."""
    shown = ["?" if d is None or str(d).startswith("unk__") else str(d) for d in shape]
    return "[" + ", ".join(shown) + "]"


def _some(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
