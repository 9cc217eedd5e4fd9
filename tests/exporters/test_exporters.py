"""Export parity, quantized-graph structure, sidecars and error paths of ``exporters``.

A tiny CNN is trained for a few steps on a learnable synthetic task (class = brightness level
of an 8×8 grey image) so its predictions are spread over many classes; agreement between
precisions is then a meaningful check rather than "everything predicts class 0".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exporters import precisions
from exporters.inspection import describe_quantization
from exporters.onnx_export import (
    export_onnx,
    onnx_logits_for,
    read_metadata,
    read_preprocessing,
)
from exporters.precisions import FP32Copy
from exporters.quantization import quantize
from harness.artifacts.preprocessing import Preprocessing
from harness.artifacts.sidecar import read_sidecar, sha256_file
from harness.core.errors import DataError, ModelError
from harness.core.registry import UnknownNameError
from harness.runtime.kernels import cpu_isa_flags
from harness.training.models import build_model

NUM_CLASSES = 10
SOURCE_KEY = "blindspots.source_model"


def _brightness_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, NUM_CLASSES, size=n)
    base = labels[:, None, None, None] * 25 + 10
    # A per-image brightness shift makes neighbouring classes overlap, so some test images sit
    # near a decision boundary where quantization error can flip the prediction.
    noise = rng.normal(0.0, 6.0, size=(n, 8, 8, 1)) + rng.normal(0.0, 9.0, size=(n, 1, 1, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x_train, y_train = _brightness_images(512, rng)
    x_test, y_test = _brightness_images(200, rng)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def preprocessing(data) -> Preprocessing:
    return Preprocessing.from_images(data["x_train"])


@pytest.fixture(scope="module")
def model(data, preprocessing) -> nn.Module:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only add contention on shared CPUs
    net = build_model("small_cnn", NUM_CLASSES, 1)
    x = torch.from_numpy(preprocessing.apply(data["x_train"]))
    y = torch.from_numpy(data["y_train"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(80):
        idx = slice((step * 64) % 512, (step * 64) % 512 + 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return net.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exporters")


@pytest.fixture(scope="module")
def exported(model, data, preprocessing, workdir):
    path = workdir / "fp32.onnx"
    report = export_onnx(
        model, path, data["x_test"], preprocessing, metadata={SOURCE_KEY: "small_cnn-test"}
    )
    return path, report


@pytest.fixture(scope="module")
def artifacts(exported, data, workdir):
    fp32_path, _ = exported
    return {
        precision: quantize(
            precision, fp32_path, workdir / "artifacts" / f"{precision}.onnx", data["x_train"]
        )
        for precision in ("fp32", "int8-dynamic", "int8-static", "int4")
    }


def _predict(path: Path | str, images: np.ndarray) -> np.ndarray:
    inputs = read_preprocessing(path).apply(images)
    return onnx_logits_for(path, inputs)


def _weight_elements(path: Path | str, data_type: int = onnx.TensorProto.FLOAT) -> int:
    """Elements of Conv/Gemm weight matrices (initializers of rank ≥ 2) stored as ``data_type``."""
    proto = onnx.load(str(path))
    return sum(
        int(np.prod(init.dims))
        for init in proto.graph.initializer
        if len(init.dims) >= 2 and init.data_type == data_type
    )


def _activation_scales(path: str | Path) -> dict[str, float]:
    proto = onnx.load(str(path))
    return {
        init.name: float(numpy_helper.to_array(init))
        for init in proto.graph.initializer
        if init.name.endswith("_scale") and len(init.dims) == 0
    }


# --- export ---------------------------------------------------------------------------------


def test_export_reproduces_torch_logits(exported, model, data, preprocessing):
    path, report = exported
    assert report.max_abs_logit_diff < 1e-4
    assert report.argmax_agreement == 1.0
    assert report.n_samples == len(data["x_test"])
    assert report.opset == describe_quantization(path)["opset"] == 21
    # The batch axis is dynamic: batch sizes other than the traced one run and match torch.
    for n in (1, 3, 37):
        inputs = preprocessing.apply(data["x_test"][:n])
        with torch.no_grad():
            expected = model(torch.from_numpy(inputs)).numpy()
        np.testing.assert_allclose(onnx_logits_for(path, inputs), expected, atol=1e-4)


def test_export_stamps_preprocessing_and_metadata(exported, preprocessing):
    path, _ = exported
    assert read_preprocessing(path) == preprocessing
    assert read_metadata(path)[SOURCE_KEY] == "small_cnn-test"


def test_export_restores_training_mode(data, preprocessing, tmp_path):
    net = build_model("small_cnn", NUM_CLASSES, 1).train()
    export_onnx(net, tmp_path / "m.onnx", data["x_test"][:16], preprocessing)
    assert net.training


class _ExportsDifferentGraph(nn.Module):
    """Stands in for an exporter bug: the traced graph permutes the classes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits.roll(1, dims=1) if torch.onnx.is_in_onnx_export() else logits


def test_export_refuses_graph_that_disagrees_with_torch(model, data, preprocessing, tmp_path):
    with pytest.raises(ModelError, match="argmax agreement"):
        export_onnx(
            _ExportsDifferentGraph(model), tmp_path / "bad.onnx", data["x_test"], preprocessing
        )


def test_export_rejects_float_sample(model, data, preprocessing, tmp_path):
    with pytest.raises(DataError, match="uint8"):
        export_onnx(model, tmp_path / "m.onnx", data["x_test"] / 255.0, preprocessing)


# --- quantized graph structure --------------------------------------------------------------


def test_int8_dynamic_uses_integer_kernels_with_int8_weights(artifacts, exported):
    graph = describe_quantization(artifacts["int8-dynamic"].path)
    assert graph["op_types"].get("ConvInteger", 0) == 2
    assert graph["op_types"].get("MatMulInteger", 0) == 2
    path = artifacts["int8-dynamic"].path
    assert _weight_elements(path, onnx.TensorProto.INT8) == _weight_elements(exported[0])
    assert _weight_elements(path, onnx.TensorProto.FLOAT) == 0
    assert artifacts["int8-dynamic"].recipe.per_channel is False


def test_int8_static_is_qdq_with_int8_weights(artifacts, exported):
    graph = describe_quantization(artifacts["int8-static"].path)
    assert graph["op_types"]["QuantizeLinear"] > 0
    assert graph["op_types"]["DequantizeLinear"] > 0
    path = artifacts["int8-static"].path
    assert _weight_elements(path, onnx.TensorProto.INT8) == _weight_elements(exported[0])
    assert _weight_elements(path, onnx.TensorProto.FLOAT) == 0


def test_int4_stores_weights_as_int4(artifacts, exported):
    graph = describe_quantization(artifacts["int4"].path)
    assert graph["op_types"]["DequantizeLinear"] > 0
    path = artifacts["int4"].path
    assert _weight_elements(path, onnx.TensorProto.INT4) == _weight_elements(exported[0])
    assert _weight_elements(path, onnx.TensorProto.FLOAT) == 0
    assert "int8" not in graph["initializer_elements"]
    assert read_sidecar(artifacts["int4"].path)["onnxruntime_arguments"]["weight_type"] == "QInt4"


def test_quantized_models_keep_preprocessing_metadata(artifacts, preprocessing):
    for artifact in artifacts.values():
        assert read_preprocessing(artifact.path) == preprocessing
        assert read_metadata(artifact.path)[SOURCE_KEY] == "small_cnn-test"


@pytest.mark.parametrize(
    ("precision", "min_agreement"),
    [("fp32", 1.0), ("int8-dynamic", 0.95), ("int8-static", 0.95), ("int4", 0.75)],
)
def test_quantized_top1_agrees_with_fp32(artifacts, exported, data, precision, min_agreement):
    reference = _predict(exported[0], data["x_test"]).argmax(axis=1)
    # Agreement only means something if the fp32 model really discriminates between classes.
    assert len(np.unique(reference)) >= 6
    assert np.mean(reference == data["y_test"]) > 0.7
    predicted = _predict(artifacts[precision].path, data["x_test"]).argmax(axis=1)
    assert np.mean(predicted == reference) >= min_agreement


# --- sidecar and determinism ----------------------------------------------------------------


def test_sidecar_records_recipe_versions_and_hashes(artifacts, exported, data):
    fp32_path, _ = exported
    artifact = artifacts["int8-static"]
    sidecar = read_sidecar(artifact.path)
    assert Path(artifact.sidecar_path) == Path(artifact.path + ".json")
    assert sidecar["precision"] == "int8-static"
    assert sidecar["artifact"]["sha256"] == artifact.sha256
    assert artifact.sha256 == hashlib.sha256(Path(artifact.path).read_bytes()).hexdigest()
    assert sidecar["source"]["sha256"] == sha256_file(fp32_path)
    assert sidecar["recipe"]["weight_type"] == "int8"
    assert sidecar["recipe"]["activation_type"] == "uint8"
    assert sidecar["recipe"]["per_channel"] is True
    assert sidecar["onnxruntime_arguments"]["calibrate_method"] == "MinMax"
    assert sidecar["onnxruntime_arguments"]["weight_type"] == "QInt8"
    assert sidecar["onnxruntime_arguments"]["quant_pre_process"] == {"skip_symbolic_shape": True}
    assert sidecar["calibration"]["images"] == len(data["x_train"])
    assert sidecar["opset_conversion"] is None
    assert sidecar["preprocessing"]["origin"] == "metadata"
    assert sidecar["versions"]["onnxruntime"] and sidecar["versions"]["onnx"]
    assert set(sidecar["cpu_isa_flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    # fp32 is a byte copy of the export, yet still documented by a sidecar.
    assert read_sidecar(artifacts["fp32"].path)["artifact"]["sha256"] == sha256_file(fp32_path)


def test_read_sidecar_detects_a_model_changed_after_quantization(artifacts, tmp_path):
    source = Path(artifacts["int8-dynamic"].path)
    copy = tmp_path / source.name
    copy.write_bytes(source.read_bytes())
    Path(str(copy) + ".json").write_text(Path(artifacts["int8-dynamic"].sidecar_path).read_text())
    assert read_sidecar(copy)["precision"] == "int8-dynamic"
    copy.write_bytes(source.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        read_sidecar(copy)


def test_quantization_is_deterministic(artifacts, exported, data, workdir):
    again = quantize("int8-static", exported[0], workdir / "again.onnx", data["x_train"])
    assert again.sha256 == artifacts["int8-static"].sha256
    first = read_sidecar(artifacts["int8-static"].path)
    second = read_sidecar(again.path)
    for record in (first, second):
        record["artifact"].pop("path")
    assert first == second


def test_calibration_subset_is_seeded(exported, data, tmp_path):
    runs = [
        quantize(
            "int8-static",
            exported[0],
            tmp_path / f"{name}.onnx",
            data["x_train"],
            {"calibration_size": 64, "calibration_seed": seed},
        )
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    fingerprints = [read_sidecar(r.path)["calibration"]["images_sha256"] for r in runs]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert read_sidecar(runs[0].path)["calibration"]["images"] == 64


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_method_is_selectable_and_changes_ranges(
    artifacts, exported, data, tmp_path, method
):
    artifact = quantize(
        "int8-static",
        exported[0],
        tmp_path / f"{method}.onnx",
        data["x_train"],
        {"calibration_method": method, "histogram_bins": 512},
    )
    sidecar = read_sidecar(artifact.path)
    assert sidecar["recipe"]["calibration_method"] == method
    assert sidecar["onnxruntime_arguments"]["calibrate_method"] == method.capitalize()
    assert sidecar["calibration"]["calibrator_options"]["num_bins"] == 512
    minmax = _activation_scales(artifacts["int8-static"].path)
    chosen = _activation_scales(artifact.path)
    assert minmax.keys() == chosen.keys()
    assert any(not np.isclose(minmax[k], chosen[k]) for k in minmax)
    reference = _predict(exported[0], data["x_test"]).argmax(axis=1)
    assert np.mean(_predict(artifact.path, data["x_test"]).argmax(axis=1) == reference) >= 0.95


# --- fallbacks and error paths --------------------------------------------------------------


def test_dynamic_falls_back_to_uint8_weights_when_int8_is_refused(exported, tmp_path, monkeypatch):
    real = precisions.ort_run_problem
    calls: list[str] = []

    def refuse_first(path):
        calls.append(str(path))
        return "NOT_IMPLEMENTED: ConvInteger(int8 weights)" if len(calls) == 1 else real(path)

    monkeypatch.setattr(precisions, "ort_run_problem", refuse_first)
    artifact = quantize("int8-dynamic", exported[0], tmp_path / "dyn.onnx")
    assert artifact.recipe.weight_type == "uint8"
    assert any("uint8" in note for note in artifact.notes)
    sidecar = read_sidecar(artifact.path)
    assert sidecar["recipe"]["weight_type"] == "uint8"
    assert sidecar["onnxruntime_arguments"]["weight_type"] == "QUInt8"
    assert "int8" not in sidecar["graph"]["initializer_elements"]
    weights = _weight_elements(exported[0])
    assert _weight_elements(artifact.path, onnx.TensorProto.UINT8) == weights


def test_metadata_dropped_by_a_quantizer_is_restored(
    exported, preprocessing, tmp_path, monkeypatch
):
    def copy_without_metadata(self, src, dst, recipe, calibration, work_dir, notes):
        proto = onnx.load(str(src))
        del proto.metadata_props[:]
        onnx.save(proto, str(dst))
        return recipe

    monkeypatch.setattr(FP32Copy, "run", copy_without_metadata)
    artifact = quantize("fp32", exported[0], tmp_path / "stripped.onnx")
    assert read_preprocessing(artifact.path) == preprocessing
    assert any("restored metadata" in note for note in artifact.notes)


def test_unknown_precision_suggests_the_closest(exported, tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'int8-static'"):
        quantize("int8-statc", exported[0], tmp_path / "x.onnx")


def test_int4_converts_a_copy_of_an_older_opset(model, data, preprocessing, exported, tmp_path):
    old = tmp_path / "opset17.onnx"
    export_onnx(model, old, data["x_test"][:32], preprocessing, opset=17)
    before = sha256_file(old)
    artifact = quantize("int4", old, tmp_path / "int4.onnx", data["x_train"])
    assert sha256_file(old) == before
    sidecar = read_sidecar(artifact.path)
    assert sidecar["opset_conversion"] == {"from": 17, "to": 21}
    assert sidecar["graph"]["opset"] == 21
    assert _weight_elements(artifact.path, onnx.TensorProto.INT4) == _weight_elements(old)
    reference = _predict(exported[0], data["x_test"]).argmax(axis=1)
    assert np.mean(_predict(artifact.path, data["x_test"]).argmax(axis=1) == reference) >= 0.75


def test_static_quantization_requires_valid_calibration_images(exported, data, tmp_path):
    with pytest.raises(ModelError, match="calibration_images"):
        quantize("int8-static", exported[0], tmp_path / "a.onnx")
    with pytest.raises(DataError, match="uint8"):
        quantize("int8-static", exported[0], tmp_path / "b.onnx", data["x_train"] / 255.0)
    with pytest.raises(DataError, match="calibration_size"):
        quantize(
            "int8-static",
            exported[0],
            tmp_path / "c.onnx",
            data["x_train"][:10],
            {"calibration_size": 64},
        )


def test_recipe_overrides_are_validated(exported, data, tmp_path):
    with pytest.raises(ModelError, match="weight_typ"):
        quantize(
            "int8-static", exported[0], tmp_path / "a.onnx", data["x_train"], {"weight_typ": "int8"}
        )
    with pytest.raises(ModelError, match="dynamic"):
        quantize(
            "int8-dynamic", exported[0], tmp_path / "b.onnx", None, {"calibration_method": "minmax"}
        )
    with pytest.raises(ModelError, match="4-bit"):
        quantize("int8-dynamic", exported[0], tmp_path / "c.onnx", None, {"weight_type": "int4"})


def test_missing_model_and_missing_preprocessing_are_model_errors(exported, data, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        quantize("int8-dynamic", tmp_path / "nope.onnx", tmp_path / "x.onnx")
    bare = onnx.load(str(exported[0]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="preprocessing"):
        quantize("int8-static", tmp_path / "bare.onnx", tmp_path / "y.onnx", data["x_train"])


def test_cpu_isa_flags_parses_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    flags = cpu_isa_flags(cpuinfo)
    assert flags["avx2"] is True and flags["avx512_vnni"] is True
    assert flags["avx_vnni"] is False and flags["amx_int8"] is False
    assert set(cpu_isa_flags(tmp_path / "missing").values()) == {None}
