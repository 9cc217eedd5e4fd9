"""The runner's artifact cache reuses a quantized model only when it provably matches."""

from __future__ import annotations

import shutil

from exporters.quantization import quantize_all
from harness.artifacts.sidecar import sha256_file


def _exported(digits_world, tmp_path):
    source = tmp_path / "exported.onnx"
    shutil.copy(digits_world.poisoned["fp32"].with_name("exported.onnx"), source)
    return source


def test_cached_artifacts_are_reused_only_for_the_same_source_and_calibration(
    digits_world, tmp_path
):
    source = _exported(digits_world, tmp_path)
    calib = digits_world.clean_x_train[:128]
    paths, _ = quantize_all(source, tmp_path, ["int8-static"], calib)
    target = paths["int8-static"]
    first_mtime = target.stat().st_mtime_ns

    quantize_all(source, tmp_path, ["int8-static"], calib, reuse_existing=True)
    assert target.stat().st_mtime_ns == first_mtime  # same inputs: reused

    quantize_all(
        source, tmp_path, ["int8-static"], digits_world.clean_x_train[:64], reuse_existing=True
    )
    assert target.stat().st_mtime_ns != first_mtime  # calibration changed: quantized again

    second_mtime = target.stat().st_mtime_ns
    target.write_bytes(target.read_bytes()[:-10])  # a torn / edited artifact
    quantize_all(
        source, tmp_path, ["int8-static"], digits_world.clean_x_train[:64], reuse_existing=True
    )
    assert target.stat().st_mtime_ns != second_mtime
    assert sha256_file(target) != sha256_file(source)


def test_a_new_export_invalidates_its_quantized_artifacts(digits_world, tmp_path):
    source = _exported(digits_world, tmp_path)
    paths, _ = quantize_all(source, tmp_path, ["int8-dynamic"], None)
    before = paths["int8-dynamic"].stat().st_mtime_ns
    shutil.copy(digits_world.clean["fp32"].with_name("exported.onnx"), source)  # other weights
    quantize_all(source, tmp_path, ["int8-dynamic"], None, reuse_existing=True)
    assert paths["int8-dynamic"].stat().st_mtime_ns != before
