"""A corpus of tiny "vendor" ONNX image classifiers, one per export style the intake must accept.

Each model is built in memory with ``onnx.helper`` from seeded random weights (milliseconds, no
downloads) and comes with the facts intake should find: layout, fixed batch, classes, the
changes it must record, and whether the published output was (log-)probabilities. They are real,
if untrained, 8×8 classifiers with 10 classes (grey ones fit the digits dataset), so the same
corpus can be audited end to end. Every model passes ``onnx.checker`` and loads in onnxruntime.

:class:`GraphBuilder` is public so tests can assemble deliberately broken models the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harness.artifacts.intake import IntakeOverrides
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing

SIZE = 8  # image height and width
CLASSES = 10
#: onnx 1.23 stamps IR 11 by default; the harness's onnxruntime reads IR <= 10 safely.
IR_VERSION = 8
GREY = IntakeOverrides(mean=(0.5,), std=(0.25,))
RGB = IntakeOverrides(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
STORED = "stored the preprocessing"  # recorded whenever flags supplied the preprocessing


@dataclass(frozen=True)
class ForeignModel:
    """One vendor-style model and what intake must conclude about it."""

    name: str
    model: onnx.ModelProto
    layout: str
    fixed_batch: int | None
    channels: int
    overrides: IntakeOverrides | None  # what an auditor passes; None: the metadata says it all
    changes: tuple[str, ...] = ()  # how each recorded change starts, all of them, in order
    softmax: str | None = None  # "Softmax"/"LogSoftmax" when the published output had one
    outputs_are_probabilities: bool = False  # a Softmax that intake must leave in place
    num_classes: int = CLASSES
    notes: str = ""

    def input_batch(self, rng: np.random.Generator, batch: int = 4) -> np.ndarray:
        """Random float32 input in the model's own layout (``fixed_batch`` images if fixed)."""
        n = self.fixed_batch or batch
        nchw = self.layout == "NCHW"
        shape = (n, self.channels, SIZE, SIZE) if nchw else (n, SIZE, SIZE, self.channels)
        return rng.normal(0.0, 1.0, shape).astype(np.float32)


@dataclass
class GraphBuilder:
    """Accumulates nodes and seeded random initializers; ``build`` makes a checked ModelProto."""

    seed: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def _name(self, prefix: str) -> str:
        return f"{prefix}_{len(self.nodes) + len(self.initializers)}"

    def const(self, value: np.ndarray | Sequence[float], dtype: type = np.float32) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape: int) -> str:
        """He-style random weights, so untrained logits still spread over a few units."""
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return self.const(self.rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str:
        names = [self._name(op_type.lower()) + (f"_{i}" if i else "") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, **attrs: object) -> str:
        pad = k // 2
        attrs.setdefault("pads", [pad] * 4)
        w, b = self.weight(cout, cin // group, k, k), self.const(np.zeros(cout))
        return self.op("Conv", x, w, b, kernel_shape=[k, k], group=group, **attrs)

    def gemm(self, x: str, fin: int, fout: int = CLASSES) -> str:
        w, b = self.weight(fout, fin), self.const(self.rng.normal(0.0, 0.1, fout))
        return self.op("Gemm", x, w, b, transB=1)

    def head(self, x: str, channels: int) -> str:
        """Global average pool, flatten, linear: the classic classifier tail."""
        return self.gemm(self.op("Flatten", self.op("GlobalAveragePool", x), axis=1), channels)

    def build(
        self,
        inputs: Sequence[tuple[str, Sequence[int | str | None]]],
        outputs: Sequence[tuple[str, int, Sequence[int | str | None]]],
        opset: int = 13,
        ir_version: int = IR_VERSION,
        initializers_as_inputs: bool = False,
        preprocessing: Preprocessing | None = None,
        check: bool = True,
    ) -> onnx.ModelProto:
        """The model; ``check=False`` skips onnx's checker for deliberately broken test graphs."""
        graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        if initializers_as_inputs:  # IR-3 / CNTK style: weights are also declared as inputs
            graph_inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                for t in self.initializers
            ]
        graph = helper.make_graph(
            self.nodes,
            "vendor",
            graph_inputs,
            [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
            self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
        )
        if preprocessing is not None:
            model.metadata_props.add(key=METADATA_KEY, value=preprocessing.to_json())
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def _logits(name: str, batch: int | str | None = "N") -> tuple[str, int, list]:
    return (name, TensorProto.FLOAT, [batch, CLASSES])


# ---------------------------------------------------------------------------- the corpus
def metadata_batch1() -> ForeignModel:
    """Already the contract: blindspots metadata, logits out; only the batch is fixed at 1."""
    g = GraphBuilder(seed=1)
    y = g.head(g.op("Relu", g.conv("image", 1, 4)), 4)
    model = g.build(
        [("image", [1, 1, SIZE, SIZE])],
        [_logits(y, 1)],
        preprocessing=Preprocessing((0.5,), (0.25,)),
    )
    return ForeignModel("metadata_batch1", model, "NCHW", 1, 1, None)


def fixed_batch16_reshape() -> ForeignModel:
    """Batch 16 baked into a Reshape constant, as static-shape exporters write it."""
    g = GraphBuilder(seed=2)
    x = g.op("Relu", g.conv("x", 1, 4, strides=[2, 2]))  # 16×4×4×4
    flat = g.op("Reshape", x, g.const([16, 64], np.int64))
    model = g.build([("x", [16, 1, SIZE, SIZE])], [_logits(g.gemm(flat, 64), 16)])
    return ForeignModel(
        "fixed_batch16_reshape",
        model,
        "NCHW",
        16,
        1,
        GREY,
        (STORED,),
    )


def nhwc_transpose() -> ForeignModel:
    """TensorFlow style: NHWC input, transposed to NCHW inside the graph."""
    g = GraphBuilder(seed=3)
    x = g.op("Transpose", "input_1", perm=[0, 3, 1, 2])
    y = g.head(g.op("Relu", g.conv(x, 3, 6)), 6)
    model = g.build([("input_1", ["batch", SIZE, SIZE, 3])], [_logits(y, "batch")])
    return ForeignModel("nhwc_transpose", model, "NHWC", None, 3, RGB, (STORED,))


def ir3_initializer_inputs() -> ForeignModel:
    """IR 3 / opset 8 (CNTK, early PyTorch): every weight is also listed as a graph input."""
    g = GraphBuilder(seed=4)
    x = g.op("MaxPool", g.op("Relu", g.conv("data", 1, 4)), kernel_shape=[2, 2], strides=[2, 2])
    y = g.gemm(g.op("Flatten", x, axis=1), 64)
    model = g.build(
        [("data", ["N", 1, SIZE, SIZE])],
        [_logits(y)],
        opset=8,
        ir_version=3,
        initializers_as_inputs=True,
    )
    changes = ("dropped 4 initializer(s)", "raised ir_version 3 to 4", STORED)
    return ForeignModel("ir3_initializer_inputs", model, "NCHW", None, 1, GREY, changes)


def softmax_output() -> ForeignModel:
    """Probabilities out (opset 13 Softmax over the last axis) plus an extra ArgMax label output."""
    g = GraphBuilder(seed=5)
    logits = g.head(g.op("Relu", g.conv("pixels", 3, 6)), 6)
    probs = g.op("Softmax", logits)
    label = g.op("ArgMax", probs, axis=1, keepdims=0)
    model = g.build(
        [("pixels", ["N", 3, SIZE, SIZE])],
        [_logits(probs), (label, TensorProto.INT64, ["N"])],
    )
    changes = ("removed final Softmax", "dropped extra output(s)", "removed 2 node(s)", STORED)
    return ForeignModel("softmax_output", model, "NCHW", None, 3, RGB, changes, "Softmax")


def logsoftmax_opset11() -> ForeignModel:
    """Opset 11 ops: Pad and Clip with tensor inputs, Resize with roi/scales; LogSoftmax out."""
    g = GraphBuilder(seed=6)
    x = g.op("Pad", "x", g.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64), mode="edge")
    x = g.conv(x, 1, 4, pads=[0, 0, 0, 0])
    x = g.op("Clip", x, g.const(0.0), g.const(6.0))
    up = g.op("Resize", x, g.const([]), g.const([1, 1, 2, 2]), mode="nearest")
    x = g.op("MaxPool", up, kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("LogSoftmax", g.head(x, 4))
    model = g.build([("x", ["N", 1, SIZE, SIZE])], [_logits(y)], opset=11)
    changes = ("removed final LogSoftmax", "removed 1 node(s)", STORED)
    return ForeignModel("logsoftmax_opset11", model, "NCHW", None, 1, GREY, changes, "LogSoftmax")


def conv_head_nc11() -> ForeignModel:
    """Fully convolutional head: a 1×1 conv to 10 channels, pooled to N×10×1×1."""
    g = GraphBuilder(seed=7)
    x = g.conv(g.op("Relu", g.conv("x", 3, 8)), 8, CLASSES, k=1)
    y = g.op("GlobalAveragePool", x)
    model = g.build([("x", ["N", 3, SIZE, SIZE])], [(y, TensorProto.FLOAT, ["N", CLASSES, 1, 1])])
    return ForeignModel("conv_head_nc11", model, "NCHW", None, 3, RGB, ("flattened output", STORED))


def opset9_upsample_softmax_flatten() -> ForeignModel:
    """Opset 9: attribute Pad, BatchNormalization, Upsample, Reshape with a shape input, and a
    Softmax (axis 1, 2-D coercion) on an N×10×1×1 head followed by Flatten."""
    g = GraphBuilder(seed=8)
    x = g.conv(g.op("Pad", "input", pads=[0, 0, 1, 1, 0, 0, 1, 1]), 1, 4, pads=[0, 0, 0, 0])
    stats = [g.const(v) for v in ([1.2] * 4, [0.1] * 4, [0.05] * 4, [0.9] * 4)]
    x = g.op("Relu", g.op("BatchNormalization", x, *stats))
    x = g.op("Upsample", x, g.const([1, 1, 2, 2]), mode="nearest")
    x = g.op("MaxPool", x, kernel_shape=[4, 4], strides=[4, 4])  # 4×4×4
    x = g.op("Reshape", x, g.const([0, 4, 16], np.int64))
    x = g.op(
        "Reshape", g.op("ReduceMean", x, axes=[2], keepdims=1), g.const([0, 4, 1, 1], np.int64)
    )
    head = g.conv(x, 4, CLASSES, k=1)
    y = g.op("Flatten", g.op("Softmax", head, axis=1), axis=1)
    model = g.build([("input", ["N", 1, SIZE, SIZE])], [_logits(y)], opset=9, ir_version=4)
    changes = ("removed final Softmax", "flattened output", "removed 2 node(s)", STORED)
    return ForeignModel(
        "opset9_upsample_softmax_flatten", model, "NCHW", None, 1, GREY, changes, "Softmax"
    )


def pad_selu_grouped_conv() -> ForeignModel:
    """Opset 13 Pad (reflect), Selu, a grouped convolution and Squeeze with an axes input."""
    g = GraphBuilder(seed=9)
    x = g.op("Pad", "x", g.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64), mode="reflect")
    x = g.op("Selu", g.conv(x, 3, 6, pads=[0, 0, 0, 0]))
    x = g.op("Relu", g.conv(x, 6, 6, group=3))
    pooled = g.op("Squeeze", g.op("GlobalAveragePool", x), g.const([2, 3], np.int64))
    model = g.build([("x", ["N", 3, SIZE, SIZE])], [_logits(g.gemm(pooled, 6))])
    return ForeignModel("pad_selu_grouped_conv", model, "NCHW", None, 3, RGB, (STORED,))


def in_graph_preprocessing_bgr() -> ForeignModel:
    """Caffe lineage: BGR 0..255 floats in, mean subtraction and scaling inside the graph."""
    g = GraphBuilder(seed=10)
    mean = g.const(np.array([104.0, 117.0, 123.0]).reshape(1, 3, 1, 1))
    x = g.op("Div", g.op("Sub", "data", mean), g.const([58.0]))
    y = g.head(g.op("Relu", g.conv(x, 3, 6)), 6)
    model = g.build([("data", ["N", 3, SIZE, SIZE])], [_logits(y)])
    overrides = IntakeOverrides(scale=1.0, mean=(0, 0, 0), std=(1, 1, 1), channel_order="BGR")
    return ForeignModel("in_graph_preprocessing_bgr", model, "NCHW", None, 3, overrides, (STORED,))


def softmax_scaled() -> ForeignModel:
    """A Softmax followed by arithmetic (×100, "percent"): it cannot be removed safely."""
    g = GraphBuilder(seed=11)
    logits = g.head(g.op("Relu", g.conv("x", 1, 4)), 4)
    y = g.op("Mul", g.op("Softmax", logits), g.const([100.0]))
    model = g.build([("x", ["N", 1, SIZE, SIZE])], [_logits(y)])
    return ForeignModel(
        "softmax_scaled",
        model,
        "NCHW",
        None,
        1,
        GREY,
        (STORED,),
        outputs_are_probabilities=True,
    )


CORPUS: tuple[Callable[[], ForeignModel], ...] = (
    metadata_batch1,
    fixed_batch16_reshape,
    nhwc_transpose,
    ir3_initializer_inputs,
    softmax_output,
    logsoftmax_opset11,
    conv_head_nc11,
    opset9_upsample_softmax_flatten,
    pad_selu_grouped_conv,
    in_graph_preprocessing_bgr,
    softmax_scaled,
)


def foreign_corpus() -> list[ForeignModel]:
    """Every corpus model, freshly built (callers may modify what they get)."""
    return [build() for build in CORPUS]


def cli_flags(overrides: IntakeOverrides | None) -> list[str]:
    """The command-line flags an auditor types to state ``overrides`` (audit and quantize)."""
    if overrides is None:
        return []
    values = overrides.model_dump(exclude_none=True)
    flags: list[str] = []
    for key in ("mean", "std"):
        if key in values:
            flags += [f"--{key}", *map(str, values[key])]
    for key in ("scale", "layout", "channel_order"):
        if key in values:
            flags += [f"--{key.replace('_', '-')}", str(values[key])]
    return flags
