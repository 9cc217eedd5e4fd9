"""Sanity before numbers: broken outputs, labels and preprocessing are caught before metrics,
and hostile ``.npz`` data files are refused in one line before anything is decompressed.

A model with NaN weights, or one collapsed to the backdoor's target class, must never be
reported as "clean accuracy 0.1, attack success rate 1.0".
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness.core.errors import DataError, ModelError
from harness.data import load_dataset
from harness.data import npz as npz_loader
from harness.runtime.kernels import session_options
from harness.runtime.sanity import (
    Finding,
    check_labels,
    check_outputs,
    check_preprocessing,
    raise_on_errors,
)

CLASSES = 10


def healthy_logits(rows: int = 40) -> np.ndarray:
    """Varied logits whose predictions cycle through every class."""
    logits = np.random.default_rng(0).standard_normal((rows, CLASSES)).astype(np.float32)
    logits[np.arange(rows), np.arange(rows) % CLASSES] += 10.0
    return logits


def codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in findings]


def raised_line(findings: list[Finding], error: type[Exception]) -> str:
    """raise_on_errors raises ``error`` with a one-line message; return it."""
    with pytest.raises(error) as info:
        raise_on_errors(findings)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- outputs


def test_healthy_outputs_have_no_findings() -> None:
    labels = np.arange(40) % CLASSES
    assert check_outputs(healthy_logits(), labels) == []
    assert raise_on_errors(check_outputs(healthy_logits())) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_a_model_error(bad: float) -> None:
    logits = healthy_logits()
    logits[[3, 17], 2] = bad
    findings = check_outputs(logits)
    assert codes(findings) == [("non_finite", "error")]
    assert "2 of 40 inputs" in raised_line(findings, ModelError)


@pytest.mark.parametrize(
    "shape", [(8, CLASSES, 1, 1), (8,), (8, 1), (0, CLASSES)], ids=["NC11", "flat", "C1", "empty"]
)
def test_outputs_that_are_not_n_by_c_logits_are_refused(shape: tuple[int, ...]) -> None:
    findings = check_outputs(np.ones(shape, np.float32))
    assert codes(findings) == [("logits_shape", "error")]
    raised_line(findings, ModelError)


def test_constant_outputs_are_degenerate() -> None:
    logits = np.tile(np.linspace(0, 1, CLASSES, dtype=np.float32), (25, 1))
    findings = check_outputs(logits)
    assert codes(findings) == [("degenerate", "error")]
    assert "identical logits for all 25 inputs" in findings[0].message


def test_one_class_predictions_are_degenerate_unless_the_inputs_share_that_class() -> None:
    logits = healthy_logits()
    logits[:, 7] += 100.0  # every prediction is class 7, logits still vary
    assert codes(check_outputs(logits)) == [("degenerate", "error")]
    assert codes(check_outputs(logits, np.arange(40) % CLASSES)) == [("degenerate", "error")]
    assert "class 7 for all 40 inputs" in raised_line(check_outputs(logits), ModelError)
    assert check_outputs(logits, np.full(40, 7)) == []  # a one-class test set is fine


def test_a_dominant_class_on_varied_labels_is_a_warning_not_an_error() -> None:
    logits = healthy_logits()
    logits[1:, 4] += 100.0  # 39 of 40 predictions are class 4
    findings = check_outputs(logits, np.arange(40) % CLASSES)
    assert codes(findings) == [("dominant_class", "warning")]
    assert raise_on_errors(findings) == findings


def _gemm_model(weight: np.ndarray, bias: np.ndarray) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


@pytest.mark.parametrize("broken", ["nan_weight", "collapsed_bias"])
def test_broken_onnx_models_never_reach_a_metric(broken: str) -> None:
    """Real onnxruntime outputs of a NaN-weight model and of a model collapsed to class 0:
    accuracy on them would read ~0.1 and the attack success rate 1.0; the checks stop that."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, CLASSES)).astype(np.float32)
    bias = np.zeros(CLASSES, np.float32)
    if broken == "nan_weight":
        weight[2, 5] = np.nan
    else:
        bias[0] = 1e4
    session = ort.InferenceSession(
        _gemm_model(weight, bias), sess_options=session_options(threads=1)
    )
    x = rng.standard_normal((50, 4)).astype(np.float32)
    logits = session.run(None, {"x": x})[0]
    labels = np.arange(50) % CLASSES
    expected = "non_finite" if broken == "nan_weight" else "degenerate"
    assert codes(check_outputs(logits, labels)) == [(expected, "error")]
    raised_line(check_outputs(logits, labels), ModelError)


# --------------------------------------------------------------------------- labels


def test_valid_labels_have_no_findings() -> None:
    assert check_labels(np.arange(100, dtype=np.uint8) % CLASSES, CLASSES) == []


@pytest.mark.parametrize(
    ("labels", "reported"),
    [
        (np.arange(100), "0..99"),
        (np.array([0, 255, 3], np.uint8), "255"),
        (np.array([1, -1, 2]), "-1"),
        (np.array([0, 2**40]), "1099511627776"),
        (np.array([0, 2**64 - 1], np.uint64), str(2**64 - 1)),
    ],
    ids=["0..99", "255", "negative", "2**40", "uint64-max"],
)
def test_labels_outside_the_model_classes_are_a_data_error(
    labels: np.ndarray, reported: str
) -> None:
    findings = check_labels(labels, CLASSES)
    assert codes(findings) == [("label_range", "error")]
    message = raised_line(findings, DataError)
    assert reported in message and "10 classes (0..9)" in message


def test_absurd_labels_allocate_nothing_label_sized() -> None:
    labels = np.full(200_000, 2**40, np.int64)  # 1.6 MB of labels
    tracemalloc.start()
    try:
        findings = check_labels(labels, CLASSES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert codes(findings) == [("label_range", "error")]
    assert peak < 100_000, peak  # no bincount sized by the label, no label-sized copy


@pytest.mark.parametrize(
    ("labels", "code"),
    [
        (np.array([0.0, 1.0]), "label_dtype"),
        (np.array([True, False]), "label_dtype"),
        (np.array(["0", "1"]), "label_dtype"),
        (np.zeros((4, 2), np.int64), "label_shape"),
        (np.zeros(0, np.int64), "no_labels"),
    ],
)
def test_malformed_labels_are_a_data_error(labels: np.ndarray, code: str) -> None:
    findings = check_labels(labels, CLASSES)
    assert codes(findings) == [(code, "error")]
    raised_line(findings, DataError)


@pytest.mark.parametrize("classes", [0, 1, -3, 2.5, True])
def test_a_nonsense_class_count_is_a_model_error(classes: object) -> None:
    findings = check_labels(np.arange(3), classes)  # type: ignore[arg-type]
    assert codes(findings) == [("num_classes", "error")]
    raised_line(findings, ModelError)


# --------------------------------------------------------------------------- preprocessing


def test_valid_preprocessing_has_no_findings() -> None:
    assert check_preprocessing((0.5, 0.4, 0.3), (0.2, 0.2, 0.25)) == []


@pytest.mark.parametrize(
    ("mean", "std", "scale", "code"),
    [
        ((0.5,), (0.0,), 1 / 255, "preprocessing_std"),
        ((0.5,), (-0.2,), 1 / 255, "preprocessing_std"),
        ((np.nan,), (0.2,), 1 / 255, "preprocessing_non_finite"),
        ((0.5,), (np.inf,), 1 / 255, "preprocessing_non_finite"),
        ((0.5,), (0.2,), 0.0, "preprocessing_scale"),
        ((0.5, 0.5), (0.2,), 1 / 255, "preprocessing_shape"),
        ((), (), 1 / 255, "preprocessing_shape"),
        (("a",), (0.2,), 1 / 255, "preprocessing_type"),
    ],
)
def test_broken_preprocessing_is_a_model_error(
    mean: tuple, std: tuple, scale: float, code: str
) -> None:
    findings = check_preprocessing(mean, std, scale)
    assert (code, "error") in codes(findings)
    raised_line(findings, ModelError)


def test_raise_on_errors_reports_the_first_error_and_counts_the_rest() -> None:
    findings = [
        *check_labels(np.arange(20), CLASSES),
        *check_preprocessing((0.5,), (0.0,), 0.0),
    ]
    message = raised_line(findings, DataError)  # the first error is about the data
    assert message.startswith("labels range over 0..19") and "(and 2 more problem(s))" in message


# --------------------------------------------------------------------------- hostile .npz


def npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {
        "x_train": rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8),
        "y_test": np.array([1, 0]),
    }


def refused(path: Path, *fragments: str) -> str:
    """Loading ``path`` raises a one-line DataError naming the file and each fragment."""
    with pytest.raises(DataError) as info:
        load_dataset("npz", str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def npy_bytes_with_header(shape: tuple[int, ...], payload: bytes, descr: str = "|u1") -> bytes:
    """A .npy whose header declares ``shape`` but which carries only ``payload``."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def write_members(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_from_the_directory_before_decompressing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(npz_loader, "MAX_UNCOMPRESSED_BYTES", 1 << 20)
    reads: list[object] = []
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: reads.append(a))
    arrays = npz_arrays()
    arrays["x_train"] = np.zeros((2048, 32, 32, 3), np.uint8)  # 6 MiB of zeros
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 100_000  # ~1000× compression: a (small) zip bomb
    refused(path, "x_train.npy", "6,291,584 bytes uncompressed", "1,048,576-byte limit")
    assert reads == []  # nothing was decompressed


def test_many_members_adding_up_past_the_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(npz_loader, "MAX_UNCOMPRESSED_BYTES", 1 << 20)
    extra = {f"pad{i}": np.zeros(300_000, np.uint8) for i in range(4)}
    path = tmp_path / "many.npz"
    np.savez_compressed(path, **npz_arrays(), **extra)
    refused(path, "in all", "1,048,576-byte limit")


def test_a_header_declaring_more_than_its_member_holds_is_refused(tmp_path: Path) -> None:
    """numpy allocates by the header's shape before reading: 2**40 pixels must never get there."""
    members = {f"{k}.npy": npy(v) for k, v in npz_arrays().items()}
    members["x_train.npy"] = npy_bytes_with_header((2**40, 4, 4, 3), bytes(64))
    path = write_members(tmp_path / "liar.npz", members)
    refused(path, "x_train", "52,776,558,133,248 bytes", "holds only")


@pytest.mark.parametrize("key", ["x_train", "y_test"])
def test_object_arrays_are_refused_without_unpickling(tmp_path: Path, key: str) -> None:
    arrays = npz_arrays()
    arrays[key] = np.array([{"evil": 1}] * len(arrays[key]), dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    refused(path, "cannot read arrays", key, "Python objects")


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("x_train", np.zeros((6, 5, 5, 3), np.int64), "must be uint8"),
        ("x_test", np.zeros((2, 75), np.uint8), "NHWC"),
        ("x_test", np.zeros((2, 5, 5, 3, 1), np.uint8), "NHWC"),
        ("x_train", np.zeros((6, 0, 5, 3), np.uint8), "empty images"),
        ("x_test", np.zeros((0, 5, 5, 3), np.uint8), "x_test holds no images"),
        ("y_train", np.zeros((6, 3), np.int64), "6 integer labels"),
        ("y_test", np.zeros(5, np.int64), "2 integer labels"),
        ("y_train", np.array([0, 1, 2, 0, 1, 2**40]), "label 1099511627776"),
        ("y_test", np.array([0, 70_000], np.uint32), "label 70000"),
    ],
)
def test_bad_npz_contents_are_refused_naming_file_and_key(
    tmp_path: Path, key: str, value: np.ndarray, complaint: str
) -> None:
    arrays = npz_arrays()
    arrays[key] = value
    if key == "x_test" and len(value) == 0:
        arrays["y_test"] = np.zeros(0, np.int64)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    refused(path, complaint, key)


def test_an_unprintable_member_name_is_refused_on_one_line(tmp_path: Path) -> None:
    members = {f"{k}.npy": npy(v) for k, v in npz_arrays().items()}
    members["evil\nname.npy"] = npy(np.zeros(1, np.uint8))
    refused(write_members(tmp_path / "names.npz", members), "unprintable name")


def test_a_valid_npz_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, **npz_arrays())
    data = load_dataset("npz", str(path))
    np.testing.assert_array_equal(data.x_train, npz_arrays()["x_train"])
    assert data.num_classes == 3 and data.y_test.tolist() == [1, 0]
