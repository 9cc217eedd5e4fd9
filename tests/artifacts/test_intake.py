"""Intake: every vendor export style in the corpus becomes the harness's contract with the same
scores, every change is recorded, the vendor's proto is never touched, and what cannot be fixed
safely is refused with one line. Also the preprocessing knobs foreign models need (scale, BGR)
and the validation that keeps a NaN std from posing as a perfect backdoor."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from harness.artifacts.intake import IntakeOverrides, check_num_classes, intake
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.core.errors import ModelError
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import session_options
from harness.runtime.oracle import PixelReplica
from tests.foreign_models import (
    CLASSES,
    CORPUS,
    GREY,
    SIZE,
    ForeignModel,
    GraphBuilder,
    in_graph_preprocessing_bgr,
)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _refused(model: onnx.ModelProto, match: str, overrides: IntakeOverrides | None = GREY) -> str:
    with pytest.raises(ModelError, match=match) as info:
        intake(model, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(params=CORPUS, ids=lambda build: build.__name__)
def foreign(request) -> ForeignModel:
    return request.param()


# ---------------------------------------------------------------------------- the corpus
def test_corpus_models_are_loadable_vendor_files(foreign):
    assert foreign.model.ir_version <= 10
    onnx.checker.check_model(foreign.model, full_check=True)
    out = _run(foreign.model, foreign.input_batch(np.random.default_rng(0)))
    assert out.shape[:2] == (foreign.fixed_batch or 4, CLASSES)


def test_intake_finds_the_facts_and_records_every_change(foreign):
    published = foreign.model.SerializeToString()
    result = intake(foreign.model, foreign.overrides)
    assert foreign.model.SerializeToString() == published  # the vendor's proto is untouched
    assert result.layout == foreign.layout
    assert result.fixed_batch == foreign.fixed_batch
    assert result.num_classes == foreign.num_classes
    assert result.preprocessing.channels == foreign.channels
    assert result.outputs_are_probabilities == foreign.outputs_are_probabilities
    assert (result.probabilities_reason is not None) == foreign.outputs_are_probabilities
    assert len(result.changes) == len(foreign.changes), result.changes
    for recorded, expected in zip(result.changes, foreign.changes, strict=True):
        assert recorded.startswith(expected), result.changes
    assert result.opset == foreign.model.opset_import[0].version


def test_contract_model_keeps_the_vendors_scores(foreign):
    result = intake(foreign.model, foreign.overrides)
    contract = result.model
    onnx.checker.check_model(contract, full_check=True)
    assert [i.name for i in contract.graph.input] == [result.input_name]
    assert [o.name for o in contract.graph.output] == [result.output_name]
    stored = {p.key: p.value for p in contract.metadata_props}[METADATA_KEY]
    assert Preprocessing.from_json(stored) == result.preprocessing  # self-describing contract

    x = foreign.input_batch(np.random.default_rng(1))
    original = _run(foreign.model, x).reshape(len(x), -1)
    logits = _run(contract, x)
    assert logits.shape == (len(x), CLASSES)
    if foreign.softmax == "Softmax":
        np.testing.assert_allclose(_softmax(logits), original, rtol=1e-5, atol=1e-7)
        assert not np.allclose(logits, original, atol=1e-2)  # really logits, not probabilities
    elif foreign.softmax == "LogSoftmax":
        np.testing.assert_allclose(np.log(_softmax(logits)), original, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(logits, original, rtol=1e-5, atol=1e-6)


def test_the_adapter_feeds_pixels_as_the_vendor_documented():
    """BGR, raw 0..255 floats: the harness's RGB uint8 pixels reach the graph channel-swapped."""
    foreign = in_graph_preprocessing_bgr()
    result = intake(foreign.model, foreign.overrides)
    pixels = np.random.default_rng(2).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    vendor_input = pixels[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    adapter = RuntimeAdapter.from_model(result.model)  # preprocessing from the stored metadata
    np.testing.assert_allclose(
        adapter.logits(pixels), _run(foreign.model, vendor_input), rtol=1e-5, atol=1e-5
    )


def test_flags_override_stored_metadata_one_knob_at_a_time():
    foreign = CORPUS[0]()  # carries (0.5,)/(0.25,) metadata
    result = intake(foreign.model, IntakeOverrides(scale=1.0))
    assert result.preprocessing == Preprocessing((0.5,), (0.25,), scale=1.0)
    assert result.changes[-1].startswith("stored the preprocessing")


# ---------------------------------------------------------------------------- refusals
def _features(shape: list, nodes_out: int = 16) -> onnx.ModelProto:
    """Conv trunk whose raw output (of the declared shape) is published as the first output."""
    g = GraphBuilder(seed=20)
    y = g.op("Relu", g.conv("x", 1, nodes_out, strides=[2, 2]))
    return g.build([("x", ["N", 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, shape)])


def test_feature_map_output_is_refused_naming_its_shape():
    message = _refused(_features(["N", 16, 4, 4]), r"output .* shaped \[N, 16, 4, 4\]")
    assert "N×C" in message


@pytest.mark.parametrize("dims", [["N"], ["N", 2, 5], ["N", 1]])
def test_outputs_that_are_not_one_score_per_class_are_refused(dims):
    g = GraphBuilder(seed=21)
    width = int(np.prod(dims[1:]))  # the Gemm emits exactly what the Reshape lays out
    flat = g.op("Flatten", g.op("GlobalAveragePool", g.conv("x", 1, 4)), axis=1)
    y = g.op("Reshape", g.gemm(flat, 4, width), g.const([-1, *dims[1:]], np.int64))
    model = g.build([("x", ["N", 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, dims)])
    _refused(model, "is not class scores")


def _batch_one(opset: int, softmax: bool, classes: int = CLASSES) -> onnx.ModelProto:
    """A fixed batch-1 graph whose scores leave squeezed to ``[C]`` (as vendors export them)."""
    g = GraphBuilder(seed=30)
    flat = g.op("Flatten", g.op("GlobalAveragePool", g.conv("x", 1, 4)), axis=1)
    y = g.op("Reshape", g.gemm(flat, 4, classes), g.const([classes], np.int64))
    if softmax:
        y = g.op("Softmax", y, axis=0 if opset < 13 else -1)
    return g.build([("x", [1, 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, [classes])], opset=opset)


@pytest.mark.parametrize(("opset", "softmax"), [(13, False), (13, True), (11, False), (11, True)])
def test_batch_less_scores_of_a_batch_one_graph_are_read_as_class_scores(opset, softmax):
    model = _batch_one(opset, softmax)
    result = intake(model, GREY)
    assert result.fixed_batch == 1 and result.num_classes == CLASSES
    assert any("batch-1 graph read as class scores" in c for c in result.changes)
    assert not result.outputs_are_probabilities
    x = np.random.default_rng(5).normal(size=(1, 1, SIZE, SIZE)).astype(np.float32)
    contract = _run(result.model, x)
    assert contract.shape == (1, CLASSES)
    published = _run(model, x)[None]  # the vendor's [C] with the batch axis the contract adds
    np.testing.assert_allclose(_softmax(contract) if softmax else contract, published, atol=1e-6)


def test_a_batch_less_output_needs_a_batch_of_one():
    """``[C]`` from a graph taking N images cannot be one score per image: still refused."""
    model = _batch_one(13, False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    _refused(model, "is not class scores")
    _refused(_batch_one(13, False, classes=1), "is not class scores")


def test_two_real_inputs_are_refused_naming_them():
    g = GraphBuilder(seed=22)
    y = g.head(g.op("Add", g.conv("x", 1, 4), g.conv("mask", 1, 4)), 4)
    model = g.build(
        [("x", ["N", 1, SIZE, SIZE]), ("mask", ["N", 1, SIZE, SIZE])],
        [(y, TensorProto.FLOAT, ["N", CLASSES])],
    )
    message = _refused(model, "expected one image input, found 2")
    assert "'x'" in message and "'mask'" in message


def test_a_model_without_outputs_is_refused():
    model = _features(["N", 16, 4, 4])
    del model.graph.output[:]
    _refused(model, "declares no outputs")


def test_ambiguous_layout_asks_for_the_flag_and_the_flag_settles_it():
    g = GraphBuilder(seed=23)
    y = g.head(g.conv("x", 3, 4), 4)
    model = g.build([("x", ["N", 3, SIZE, 3])], [(y, TensorProto.FLOAT, ["N", CLASSES])])
    rgb = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    _refused(model, r"NCHW or NHWC.*--layout", IntakeOverrides(**rgb))
    assert intake(model, IntakeOverrides(layout="NCHW", **rgb)).layout == "NCHW"


def test_non_image_and_non_float_inputs_are_refused():
    g = GraphBuilder(seed=24)
    model = g.build([("x", ["N", 64])], [(g.gemm("x", 64), TensorProto.FLOAT, ["N", CLASSES])])
    _refused(model, "not a rank-4 image batch")
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    _refused(model, "takes UINT8")


def test_missing_preprocessing_names_the_flags_to_pass():
    foreign = CORPUS[1]()  # no metadata
    message = _refused(foreign.model, "no 'blindspots.preprocessing' metadata", None)
    assert "--mean" in message and "--std" in message and "--scale" in message
    _refused(foreign.model, "takes 1 channel", IntakeOverrides(mean=(0, 0, 0), std=(1, 1, 1)))


def test_nan_std_is_refused_from_metadata_and_from_flags():
    foreign = CORPUS[0]()
    meta = foreign.model.metadata_props[0]
    meta.value = '{"mean": [0.5], "std": [NaN], "layout": "NCHW"}'
    _refused(foreign.model, r"invalid preprocessing metadata .*std must be finite", None)
    with pytest.raises(ModelError, match=r"intake option 'std\.0'") as info:
        IntakeOverrides(mean=(0.5,), std=(float("nan"),))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="unknown intake option 'men'"):
        IntakeOverrides(men=(0.5,))


def test_wrong_class_count_is_refused():
    g = GraphBuilder(seed=25)
    y = g.gemm(g.op("Flatten", g.op("GlobalAveragePool", g.conv("x", 1, 4)), axis=1), 4, 100)
    model = g.build([("x", ["N", 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, ["N", 100])])
    result = intake(model, GREY)
    assert result.num_classes == 100
    check_num_classes(result, 100)
    with pytest.raises(ModelError, match="outputs 100 class scores but the dataset has 10") as info:
        check_num_classes(result, 10)
    assert "\n" not in str(info.value)


def test_softmax_over_the_batch_axis_is_kept_and_flagged():
    g = GraphBuilder(seed=26)
    y = g.op("Softmax", g.head(g.conv("x", 1, 4), 4), axis=0)
    model = g.build([("x", ["N", 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, ["N", CLASSES])])
    result = intake(model, GREY)
    assert result.outputs_are_probabilities
    assert "normalises axis 0" in (result.probabilities_reason or "")
    assert result.output_name == y


@pytest.mark.parametrize(("opset", "stripped"), [(11, True), (13, False)])
def test_softmax_axis_follows_the_opset_semantics(opset, stripped):
    """Softmax(axis=1) on N×1×10 normalises all 10 scores before opset 13 (2-D coercion) but
    only the size-1 axis from 13 on (every output 1.0): only the former hides logits."""
    g = GraphBuilder(seed=27)
    scores = g.op("Reshape", g.head(g.conv("x", 1, 4), 4), g.const([-1, 1, CLASSES], np.int64))
    y = g.op("Reshape", g.op("Softmax", scores, axis=1), g.const([-1, CLASSES], np.int64))
    model = g.build(
        [("x", ["N", 1, SIZE, SIZE])], [(y, TensorProto.FLOAT, ["N", CLASSES])], opset=opset
    )
    result = intake(model, GREY)
    assert result.outputs_are_probabilities is not stripped
    x = np.random.default_rng(4).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    if stripped:
        np.testing.assert_allclose(_softmax(_run(result.model, x)), _run(model, x), atol=1e-6)
    else:
        assert re.search(r"normalises axis 1 of \[.*, 1, 10\]", result.probabilities_reason or "")


# ---------------------------------------------------------------------------- preprocessing
def _pixels(channels: int = 3) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (4, 5, 6, channels), dtype=np.uint8)


def test_default_preprocessing_is_bit_identical_to_the_published_formula():
    pp = Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    pixels = _pixels()
    x = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.float32([0.1, 0.2, 0.3])) / np.float32([0.4, 0.5, 0.6])
    np.testing.assert_array_equal(pp.apply(pixels), x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bgr_and_raw_scale_preprocessing(layout):
    pp = Preprocessing((104.0, 117.0, 123.0), (58.0, 57.0, 57.5), layout, 1.0, "BGR")
    pixels = _pixels()
    bgr = pixels[..., ::-1].astype(np.float32)
    x = (bgr - np.float32([104.0, 117.0, 123.0])) / np.float32([58.0, 57.0, 57.5])
    expected = x.transpose(0, 3, 1, 2) if layout == "NCHW" else x
    np.testing.assert_array_equal(pp.apply(pixels), expected)


@pytest.mark.parametrize(
    "pp",
    [
        Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
        Preprocessing((104.0, 117.0, 123.0), (58.0, 57.0, 57.5), "NHWC", 1.0, "BGR"),
        Preprocessing((0.5,), (0.25,), "NCHW", 1.0 / 127.5),
    ],
)
def test_pixel_replica_mirrors_apply_bit_for_bit(pp):
    replica = PixelReplica(torch.nn.Identity(), pp)
    pixels = _pixels(pp.channels)
    ours = replica(torch.from_numpy(pixels.astype(np.float32))).numpy()
    np.testing.assert_array_equal(ours, pp.apply(pixels))


def test_metadata_from_older_versions_still_loads_and_new_keys_round_trip():
    old = Preprocessing.from_json('{"mean": [0.5], "std": [0.25]}')
    assert (old.scale, old.channel_order, old.layout) == (1.0 / 255.0, "RGB", "NCHW")
    new = Preprocessing((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "NHWC", 1.0, "BGR")
    assert Preprocessing.from_json(new.to_json()) == new
    assert json.loads(new.to_json())["channel_order"] == "BGR"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.5,), "std": (float("nan"),)}, "std must be finite and positive"),
        ({"mean": (0.5,), "std": (0.0,)}, "std must be finite and positive"),
        ({"mean": (float("inf"),), "std": (1.0,)}, "mean must be finite"),
        ({"mean": (0.5,), "std": (1.0,), "scale": float("nan")}, "scale must be finite"),
        ({"mean": (0.5,), "std": (1.0,), "scale": -1.0}, "scale must be finite and positive"),
        ({"mean": (0.5,), "std": (1.0,), "channel_order": "BGR"}, "BGR needs 3 channels"),
        ({"mean": (0.5,), "std": (1.0,), "channel_order": "GBR"}, "RGB or BGR"),
        ({"mean": "0.5", "std": (1.0,)}, "mean must be a list of numbers"),
    ],
)
def test_broken_preprocessing_is_refused_in_one_line(kwargs, match):
    with pytest.raises(ModelError, match=match) as info:
        Preprocessing(**kwargs)
    assert "\n" not in str(info.value)
