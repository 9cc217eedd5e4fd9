"""What a graph reads: its data inputs, the image input, a declared batch, the first convolution.

Small proto helpers shared by the runtime adapter, the exporters and intake; they live on the
artifacts floor so that quantizing a file does not load onnxruntime or torch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not weights (IR < 4 files list every initializer as an input)."""
    weights = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in weights]


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The model's one image input (checked when the adapter is built)."""
    return data_inputs(model)[0]


def declared_batch(value: onnx.ValueInfoProto) -> int | None:
    """The batch size an input declares, when it declares a number rather than a symbol."""
    dims = value.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def first_conv_kernel(model: onnx.ModelProto) -> np.ndarray | None:
    """The constant weights of the graph's first Conv node, or None when it has none."""
    weights = {init.name: init for init in model.graph.initializer}
    conv = next((node for node in model.graph.node if node.op_type == "Conv"), None)
    if conv is None or len(conv.input) < 2 or conv.input[1] not in weights:
        return None
    return numpy_helper.to_array(weights[conv.input[1]])
