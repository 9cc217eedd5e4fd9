"""Quantizing vendor ONNX files: no blindspots metadata, old opsets, external weights, hostile
inputs — and the guarantees a user relies on: the source is never modified, failures are one
``ModelError`` line, and the destination holds a model with its own sidecar or nothing new.

Models are tiny CNNs built here with onnx.helper (no torch, no downloads), so the module runs in
a few seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from exporters import inspection, precisions, quantization
from exporters.inspection import ort_run_problem
from exporters.onnx_export import read_preprocessing
from exporters.quantization import quantize
from exporters.recipes import QuantRecipe
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.artifacts.sidecar import read_sidecar, sha256_file, sidecar_precision
from harness.cli.app import main
from harness.core.atomic import PARTIAL_MARK, remove_partials
from harness.core.errors import ModelError
from harness.runtime.kernels import DEFAULT_PROFILE, session_options
from tests.foreign_models import cli_flags, foreign_corpus

ROOT = Path(__file__).resolve().parents[2]
PRE = Preprocessing(mean=(0.5,), std=(0.25,))
IR_FOR_OPSET = {9: 4, 11: 6, 13: 7, 21: 10}


def _vendor_cnn(opset: int = 13, inputs: int = 1) -> onnx.ModelProto:
    """Conv → Relu → GlobalAveragePool → Flatten → Gemm, as a vendor exporter of that opset
    writes it: no blindspots metadata."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (5, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], transB=1),
    ]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])]
    if inputs == 2:
        graph_inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]))
        nodes.append(helper.make_node("Add", ["logits", "y"], ["sum"]))
    output = "sum" if inputs == 2 else "logits"
    graph = helper.make_graph(
        nodes,
        "vendor_cnn",
        graph_inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_FOR_OPSET[opset]
    )
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (32, 8, 8, 1)).astype(np.uint8)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _logits(path: Path | str, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(path), session_options(threads=1), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": PRE.apply(pixels)})[0]


def _agreement(a: Path | str, b: Path | str, pixels: np.ndarray) -> float:
    return float(np.mean(_logits(a, pixels).argmax(1) == _logits(b, pixels).argmax(1)))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _opset(path: Path | str) -> int:
    return inspection.model_opset(onnx.load(str(path), load_external_data=False))


# --- preprocessing for models without blindspots metadata ------------------------------------


def test_calibrated_precision_without_preprocessing_names_the_flags(tmp_path, images):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="--mean/--std") as caught:
        quantize("int8-static", src, out / "m.onnx", images)
    assert "--scale" in str(caught.value) and "--layout" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _listing(out) == []


def test_explicit_preprocessing_normalises_calibration_and_is_stamped(tmp_path, images):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    artifact = quantize("int8-static", src, tmp_path / "q.onnx", images, preprocessing=PRE)
    assert read_preprocessing(artifact.path) == PRE
    sidecar = read_sidecar(artifact.path)
    assert sidecar["preprocessing"]["origin"] == "argument"
    assert sidecar["preprocessing"]["mean"] == [0.5]
    # The input quantizer's range is the range of the *normalised* calibration images.
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(artifact.path).graph.initializer}
    normalised = PRE.apply(images)
    expected_scale = (normalised.max() - min(normalised.min(), 0.0)) / 255.0
    assert float(inits["x_scale"]) == pytest.approx(expected_scale, rel=1e-5)
    assert _agreement(artifact.path, src, images) >= 0.9


def test_dynamic_precision_needs_no_preprocessing_and_invents_none(tmp_path):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    artifact = quantize("int8-dynamic", src, tmp_path / "q.onnx")
    meta = {p.key for p in onnx.load(artifact.path, load_external_data=False).metadata_props}
    assert METADATA_KEY not in meta
    assert read_sidecar(artifact.path)["preprocessing"] is None


def test_preprocessing_contradicting_the_model_input_is_refused(tmp_path, images):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    rgb = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(ModelError, match="1 channel"):
        quantize("int8-dynamic", src, tmp_path / "a.onnx", preprocessing=rgb)
    nhwc = Preprocessing(mean=(0.5,), std=(0.25,), layout="NHWC")
    with pytest.raises(ModelError, match="NHWC"):
        quantize("int8-static", src, tmp_path / "b.onnx", images, preprocessing=nhwc)
    assert _listing(tmp_path) == ["vendor.onnx"]


# --- opset conversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opset", "precision", "target"),
    [(9, "int8-static", 13), (11, "int8-static", 13), (9, "int8-dynamic", 11), (13, "int4", 21)],
)
def test_old_opset_is_converted_on_a_copy(tmp_path, images, opset, precision, target):
    src = _save(_vendor_cnn(opset), tmp_path / "vendor.onnx")
    before = sha256_file(src)
    artifact = quantize(precision, src, tmp_path / "q.onnx", images, preprocessing=PRE)
    assert sha256_file(src) == before
    assert _opset(src) == opset
    sidecar = read_sidecar(artifact.path)
    assert sidecar["opset_conversion"] == {"from": opset, "to": target}
    assert any(f"opset {opset} to {target}" in note for note in artifact.notes)
    assert _opset(artifact.path) == target
    onnx.checker.check_model(onnx.load(artifact.path), full_check=True)
    assert _agreement(artifact.path, src, images) >= (0.75 if precision == "int4" else 0.9)


def test_new_enough_opset_is_not_converted(tmp_path, images):
    src = _save(_vendor_cnn(13), tmp_path / "vendor.onnx")
    artifact = quantize("int8-static", src, tmp_path / "q.onnx", images, preprocessing=PRE)
    assert read_sidecar(artifact.path)["opset_conversion"] is None
    assert _opset(artifact.path) == 13


def test_failed_conversion_names_the_source_opset_and_leaves_nothing(tmp_path, images, monkeypatch):
    src = _save(_vendor_cnn(9), tmp_path / "vendor.onnx")

    def no_adapter(model, target):
        raise RuntimeError("No Adapter For Conv\n(more converter detail)")

    monkeypatch.setattr(quantization.version_converter, "convert_version", no_adapter)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="opset 9") as caught:
        quantize("int8-static", src, out / "q.onnx", images, preprocessing=PRE)
    message = str(caught.value)
    assert "No Adapter For Conv" in message and "\n" not in message
    assert _listing(out) == []


# --- failures leave nothing behind ------------------------------------------------------------


def test_unrunnable_output_blames_the_quantized_model_and_keeps_the_old_artifact(
    tmp_path, images, monkeypatch
):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    out = tmp_path / "out"
    old = quantize("int8-static", src, out / "q.onnx", images, preprocessing=PRE)
    listing = _listing(out)
    monkeypatch.setattr(
        quantization,
        "ort_run_problem",
        lambda path: "NOT_IMPLEMENTED : Could not find an implementation for DequantizeLinear(21)",
    )
    with pytest.raises(ModelError, match="cannot run the quantized int4 model") as caught:
        quantize("int4", src, out / "q.onnx", images, preprocessing=PRE)
    assert "input of shape" not in str(caught.value)
    assert _listing(out) == listing  # no temporary files, no half-written model
    assert read_sidecar(out / "q.onnx")["artifact"]["sha256"] == old.sha256


KILLED_QUANTIZE = """
import os, signal, sys
from pathlib import Path

real_replace = os.replace

def replace(src, dst, **kwargs):  # both files written beside the target, neither moved yet
    if Path(dst).name == "q.onnx":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, **kwargs)

os.replace = replace
from exporters.quantization import quantize
quantize("int8-dynamic", sys.argv[1], sys.argv[2])
"""


def test_a_killed_quantization_leaves_only_temporary_files_the_cleanup_removes(tmp_path):
    """SIGKILL just before the model is moved into place: no finally runs, so the model's and
    the sidecar's temporary files stay, named as every atomic write names them, and
    ``remove_partials`` (what a rerun holding the run lock calls) takes both away."""
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    out = tmp_path / "out"
    argv = [sys.executable, "-c", KILLED_QUANTIZE, str(src), str(out / "q.onnx")]
    child = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    leftovers = sorted(out.iterdir())
    assert [p.name.split(".")[1:3] for p in leftovers] == [["q", "onnx"], ["q", "onnx"]]
    assert all(PARTIAL_MARK in p.name for p in leftovers)
    assert sorted(remove_partials(out)) == leftovers
    assert _listing(out) == []


def _pydantic_error() -> ValidationError:
    try:
        QuantRecipe.model_validate({"precision": "x", "format": "bogus"})
    except ValidationError as exc:
        return exc
    raise AssertionError("QuantRecipe accepted an invalid format")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ValueError(
                "The truth value of an array with more than one element is ambiguous. "
                "Use a.any() or a.all()"
            ),
            "ValueError: The truth value of an array",
        ),
        (
            RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (Conv) failed\nstack line 1"),
            "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Node (Conv) failed",
        ),
        (_pydantic_error(), "invalid field 'format'"),
    ],
    ids=["numpy", "onnxruntime", "pydantic"],
)
def test_library_errors_become_one_line_model_errors(
    tmp_path, images, monkeypatch, error, expected
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(precisions, "quantize_static", fail)
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="to int8-static") as caught:
        quantize("int8-static", src, out / "q.onnx", images, preprocessing=PRE)
    message = str(caught.value)
    assert expected in message and "\n" not in message
    assert _listing(out) == []


def _garbage(folder: Path) -> Path:
    path = folder / "junk.onnx"
    path.write_bytes(b"\x08\x07junk" * 50)
    return path


def _external_outside(folder: Path) -> Path:
    """A model whose external weights claim to live outside its folder."""
    inner = folder / "inner"
    inner.mkdir()
    save_args = {"save_as_external_data": True, "location": "w.bin", "size_threshold": 0}
    onnx.save(_vendor_cnn(), str(inner / "m.onnx"), **save_args)
    (folder / "secret.bin").write_bytes((inner / "w.bin").read_bytes())
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    return _save(proto, inner / "hostile.onnx")


def _bad_metadata(folder: Path) -> Path:
    model = _vendor_cnn()
    model.metadata_props.add(key=METADATA_KEY, value='{"mean": [0.5], "std": "oops"')
    return _save(model, folder / "bad_meta.onnx")


@pytest.mark.parametrize(
    ("make", "preprocessing", "match"),
    [
        (_garbage, PRE, "cannot read"),
        (_external_outside, PRE, "points outside"),
        (_bad_metadata, None, "malformed preprocessing"),
        (lambda folder: _save(_vendor_cnn(inputs=2), folder / "two.onnx"), PRE, "one image input"),
    ],
    ids=["garbage", "external-outside-folder", "bad-metadata", "two-inputs"],
)
def test_hostile_files_are_one_line_model_errors(tmp_path, images, make, preprocessing, match):
    src = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=match) as caught:
        quantize("int8-static", src, out / "q.onnx", images, preprocessing=preprocessing)
    assert "\n" not in str(caught.value)
    assert _listing(out) == []


# --- external data ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic", "int8-static"])
def test_external_weights_inside_the_folder_give_a_single_file_artifact(
    tmp_path, images, precision
):
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    onnx.save(
        _vendor_cnn(),
        str(vendor / "model.onnx"),
        save_as_external_data=True,
        location="model.weights",
        size_threshold=0,
    )
    src = vendor / "model.onnx"
    out = tmp_path / "elsewhere"
    artifact = quantize(precision, src, out / "q.onnx", images, preprocessing=PRE)
    assert _listing(out) == ["q.onnx", "q.onnx.json"]
    proto = onnx.load(artifact.path, load_external_data=False)
    assert not any(init.external_data for init in proto.graph.initializer)
    external = read_sidecar(artifact.path)["source"]["external_data"]
    assert external == {"model.weights": sha256_file(vendor / "model.weights")}
    reference = tmp_path / "reference.onnx"
    onnx.save(onnx.load(str(src)), str(reference))
    assert _agreement(artifact.path, reference, images) >= 0.9


# --- smoke run ----------------------------------------------------------------------------------


def _fixed_uint8_model(batch: int) -> onnx.ModelProto:
    """uint8 input of fixed batch 3 whose Reshape only works with exactly that many elements."""
    nodes = [
        helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["as_float", "shape"], ["flat"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [batch, 4])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [12])],
        [numpy_helper.from_array(np.array([12], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_smoke_run_feeds_the_declared_dtype_and_fixed_batch(tmp_path, monkeypatch):
    profiles: list[str] = []

    def recording(profile: str = DEFAULT_PROFILE, threads: int | None = None):
        profiles.append(profile)
        return session_options(profile, threads)

    monkeypatch.setattr(inspection, "session_options", recording)
    assert ort_run_problem(_save(_fixed_uint8_model(3), tmp_path / "fixed.onnx")) is None
    assert profiles == [DEFAULT_PROFILE]
    problem = ort_run_problem(_save(_fixed_uint8_model(2), tmp_path / "wrong.onnx"))
    assert problem is not None and "\n" not in problem


# --- reduce_range ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8-static", "int8-dynamic"])
def test_reduce_range_reaches_onnxruntime_and_the_sidecar(tmp_path, images, precision):
    """Reduced-range int8 weights never saturate the int16 pair sums of u8×s8 AVX2 kernels.

    onnxruntime's reduced int8 range is [-64, 64] (symmetric weights reach ±64): 2·255·64 =
    32 640 still fits int16, which is the whole point of the option.
    """
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    weights = {}
    for reduce_range in (False, True):
        artifact = quantize(
            precision,
            src,
            tmp_path / f"{reduce_range}.onnx",
            images,
            {"reduce_range": reduce_range},
            preprocessing=PRE,
        )
        sidecar = read_sidecar(artifact.path)
        assert sidecar["recipe"]["reduce_range"] is reduce_range
        assert sidecar["onnxruntime_arguments"]["reduce_range"] is reduce_range
        weights[reduce_range] = np.concatenate(
            [
                numpy_helper.to_array(init).ravel().astype(np.int32)
                for init in onnx.load(artifact.path).graph.initializer
                if init.data_type == TensorProto.INT8 and len(init.dims) >= 2
            ]
        )
    assert weights[True].min() >= -64 and weights[True].max() <= 64
    assert 2 * 255 * np.abs(weights[True]).max() <= np.iinfo(np.int16).max
    assert np.abs(weights[False]).max() == 127  # the default uses the full int8 range


# --- verified sidecar precision ----------------------------------------------------------------


def test_sidecar_precision_only_vouches_for_its_own_model(tmp_path, images):
    src = _save(_vendor_cnn(), tmp_path / "vendor.onnx")
    dynamic = quantize("int8-dynamic", src, tmp_path / "dyn.onnx")
    assert sidecar_precision(dynamic.path) == "int8-dynamic"
    # A sidecar copied next to another model does not relabel it.
    sidecar = Path(dynamic.sidecar_path).read_text()
    (tmp_path / "vendor.onnx.json").write_text(sidecar.replace("int8-dynamic", "fp32"))
    assert sidecar_precision(src) is None
    # Nor does a sidecar whose model changed afterwards, a missing or a malformed one.
    Path(dynamic.path).write_bytes(Path(dynamic.path).read_bytes() + b"\0")
    assert sidecar_precision(dynamic.path) is None
    assert sidecar_precision(tmp_path / "nothing.onnx") is None
    (tmp_path / "odd.onnx").write_bytes(b"x")
    for text in ("{not json", json.dumps({"artifact": "x", "precision": "fp32"}), "[]"):
        (tmp_path / "odd.onnx.json").write_text(text)
        assert sidecar_precision(tmp_path / "odd.onnx") is None


# ------------------------------------------------------------------------ the export-style corpus
@pytest.fixture(scope="module")
def corpus_data(rgb_npz) -> dict[int, list[str]]:
    """Dataset flags per channel count: digits for grey models, the tiny RGB npz otherwise."""
    return {1: ["--dataset", "digits"], 3: ["--dataset", "npz", "--data-root", str(rgb_npz)]}


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static", "int4"])
@pytest.mark.parametrize("case", foreign_corpus(), ids=lambda c: c.name)
def test_every_export_style_quantizes_from_the_command_line(
    case, precision, tmp_path, corpus_data, capsys
):
    """Each vendor export style, as published (fixed batch 1 or 16, NHWC, IR-3 initializer
    inputs, Softmax heads, opsets 9-13, in-graph preprocessing) quantizes with the preprocessing
    given as flags, and the artifact runs in onnxruntime on the model's own input batch."""
    source = _save(case.model, tmp_path / "vendor" / f"{case.name}.onnx")
    out = tmp_path / f"{case.name}-{precision}.onnx"
    code = main(
        [
            "quantize",
            "--model",
            str(source),
            "--precision",
            precision,
            "--calibration-size",
            "48",
            *corpus_data[case.channels],
            *cli_flags(case.overrides),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sidecar_precision(out) == precision
    batch = case.input_batch(np.random.default_rng(0))
    session = ort.InferenceSession(
        str(out), session_options(DEFAULT_PROFILE, 1), providers=["CPUExecutionProvider"]
    )
    expected = ort.InferenceSession(
        str(source), session_options(DEFAULT_PROFILE, 1), providers=["CPUExecutionProvider"]
    ).run(None, {session.get_inputs()[0].name: batch})
    got = session.run(None, {session.get_inputs()[0].name: batch})
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(np.isfinite(g).all() for g in got)
    if precision == "int8-static" and case.fixed_batch:
        calibration = read_sidecar(out)["calibration"]
        assert calibration["fixed_batch"] == case.fixed_batch
        assert calibration["images"] % case.fixed_batch == 0
