"""INT8 kernel profiles: settings, the measured host class, and numbers that hold on any x86 CPU.

The emulated-CPU tests run this project's own code under ``qemu-x86_64 -cpu Haswell-v4`` (Debian's
qemu-user): an AVX2-only x86 CPU on which onnxruntime's default u8×s8 kernels saturate int16 pair
sums, whatever CPU runs the suite. They are skipped where qemu-user is not installed (CI installs
it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.core.errors import BlindspotsError, ModelError
from harness.pipeline.config import build_config
from harness.report.render import render_kernel_drift
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import (
    EXACT,
    PRECISION_MODE_KEY,
    SATURATING,
    HostKernels,
    cpu_isa_flags,
    probe_host,
    profile_record,
    session_config_entries,
)
from tests.runtime.test_replica_coverage import _qoperator_model

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-x86_64) not installed")


#: Emulated AVX2-only CPUs without VNNI, one per x86 vendor: an Intel Haswell and an AMD Zen 2.
#: Libraries below torch choose code paths by vendor as well as by vector width.
EMULATED_CPUS = ("Haswell-v4", "EPYC-Rome")


def _emulated(*args: str, cpu: str = "Haswell-v4", timeout: int = 600) -> dict:
    """Run tests/emulated_cpu.py on an emulated AVX2-only CPU and parse its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_"))}
    completed = subprocess.run(
        [
            QEMU,
            "-cpu",
            cpu,
            sys.executable,
            str(ROOT / "tests" / "emulated_cpu.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- settings
def test_exact_profile_sets_onnxruntimes_precision_mode_and_host_sets_nothing():
    assert session_config_entries("exact") == {PRECISION_MODE_KEY: "1"}
    assert session_config_entries("host") == {}


def test_unknown_profile_is_a_one_line_error():
    with pytest.raises(ModelError, match="unknown INT8 kernel profile 'fast'") as info:
        session_config_entries("fast")
    assert "\n" not in str(info.value)
    with pytest.raises(BlindspotsError, match="int8_kernels"):
        build_config({"int8_kernels": "fast"})


def test_config_defaults_to_exact_and_bounds_seeds():
    assert build_config({}).int8_kernels == "exact"
    with pytest.raises(BlindspotsError, match="seeds"):
        build_config({"seeds": [2**64]})
    with pytest.raises(BlindspotsError, match="seeds"):
        build_config({"seeds": [-1]})


def test_host_probe_verifies_the_exact_profile_and_classifies_the_host():
    host = probe_host()
    assert host.exact_verified, host.outputs
    for values in host.outputs.values():
        assert values["exact"] == pytest.approx(values["int32_reference"], rel=0.02)
    flags = {flag for flag, present in cpu_isa_flags().items() if present}
    if flags and {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        assert host.kernel_class == EXACT  # VNNI/AMX accumulate pairs in int32
    elif flags and "avx2" in flags:
        assert host.kernel_class == SATURATING  # vpmaddubsw: saturating int16 pair sums


def test_adapter_records_its_profile_and_masked_copies_keep_it(digits_world):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["int8-static"], kernel_profile="host")
    keep = np.ones(adapter.last_conv_channels, dtype=bool)
    keep[0] = False
    assert adapter.with_channels_masked(keep).kernel_profile == "host"
    with pytest.raises(ModelError, match="unknown INT8 kernel profile"):
        RuntimeAdapter.from_path(digits_world.poisoned["fp32"], kernel_profile="fastest")


def test_profile_record_names_profile_host_class_and_session_entries():
    record = profile_record("exact")
    assert record["profile"] == "exact"
    assert record["host_kernel_class"] in (EXACT, SATURATING)
    assert record["session_config_entries"] == {PRECISION_MODE_KEY: "1"}


# ------------------------------------------------------------------------------- report
def _run_record(precision: str, drift: dict | None) -> dict:
    record = {
        "seed": 0,
        "poisoned": True,
        "precision": precision,
        "clean_acc": 0.98,
        "asr": 1.0,
        "agreement_fp32": 1.0,
        "defenses": {"strip": {"status": "ok", "detected": True}},
    }
    if drift is not None:
        record["kernel_drift"] = drift
    return record


def test_report_shows_host_vs_exact_drift_per_cell():
    drift = {
        "kernels": {"profile": "host"},
        "clean_acc": 0.9378,
        "asr": 0.84,
        "agreement_fp32": 0.944,
        "defenses": {"strip": {"status": "ok", "detected": False}},
    }
    report = {
        "config": {"int8_kernels": "exact"},
        "environment": {"int8_kernels": {"kernel_class": SATURATING, "profiles_differ": True}},
        "runs": [_run_record("fp32", None), _run_record("int8-static", drift)],
    }
    text = "\n".join(render_kernel_drift(report))
    assert "| 0 | poisoned | int8-static | 0.9800 → 0.9378 | 1.0000 → 0.8400 |" in text
    assert "strip: detected → not detected" in text
    assert "| 0 | poisoned | fp32 |" not in text


def test_report_says_when_profiles_coincide():
    report = {
        "config": {},
        "environment": {"int8_kernels": {"kernel_class": EXACT, "profiles_differ": False}},
        "runs": [_run_record("int8-static", None)],
    }
    assert "coincide" in "\n".join(render_kernel_drift(report))


# ------------------------------------------------------------------------------- runner
def test_runner_measures_every_quantized_cell_under_both_profiles_where_they_differ(
    tmp_path, monkeypatch
):
    """Plumbing of the drift cells, on any host: the probe is told the host saturates."""
    import harness.pipeline.evaluate as evaluate
    import harness.pipeline.runner as runner
    from harness.report.data import build_report
    from harness.report.render import render_markdown

    monkeypatch.setattr(evaluate, "probe_host", lambda: HostKernels(SATURATING, True, {}))
    config = build_config(
        {
            "dataset": "digits",
            "model": "small_cnn",
            "attack_params": {"patch_size": 3, "poison_rate": 0.1, "target_label": 0},
            "training": {"epochs": 2, "batch_size": 64},
            "precisions": ["fp32", "int8-static"],
            "defenses": ["strip"],
            "defense_params": {"strip": {"n_overlays": 8, "n_test": 20}},
            "clean_control": False,
            "eval_limit": 100,
            "threads": 1,
        }
    )
    runner.run_experiment(config, tmp_path, log=lambda _: None)
    runs = {r["precision"]: r for r in build_report(tmp_path)["runs"]}
    assert "kernel_drift" not in runs["fp32"]
    drift = runs["int8-static"]["kernel_drift"]
    assert drift["kernels"]["profile"] == "host"
    assert runs["int8-static"]["kernels"]["profile"] == "exact"
    assert set(drift["defenses"]) == {"strip"}
    assert 0.0 <= drift["clean_acc"] <= 1.0
    assert "Host vs exact INT8 kernels" in render_markdown(build_report(tmp_path))


# ------------------------------------------------------------------------------- emulated CPU
@needs_qemu
@pytest.mark.parametrize("cpu", EMULATED_CPUS)
def test_emulated_avx2_cpu_is_measured_as_saturating_and_exact_profile_fixes_it(cpu):
    host = _emulated("probe", cpu=cpu)
    assert host["kernel_class"] == SATURATING
    assert host["exact_verified"] is True
    for values in host["outputs"].values():
        assert values["host"] < 0.6 * values["int32_reference"]  # pairs clamped at 32 767


@needs_qemu
@pytest.mark.parametrize("cpu", EMULATED_CPUS)
def test_exact_profile_gives_the_same_int8_numbers_on_an_avx2_cpu(cpu, digits_world, tmp_path):
    """Same INT8 file, same images: bit-identical logits here and on a saturating CPU under
    ``exact``; under ``host`` the emulated CPU's numbers drift and the parity gate says why."""
    images = np.concatenate([digits_world.x_test[:96], digits_world.triggered_x[:96]])
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, images)
    model = str(digits_world.poisoned["int8-static"])
    emulated = _emulated("logits", model, str(pixels), cpu=cpu)
    native = RuntimeAdapter.from_path(model, kernel_profile="exact").logits(images)
    assert emulated["exact"]["sha256"] == hashlib.sha256(native.tobytes()).hexdigest()
    assert emulated["exact"]["parity_passed"] is True
    assert emulated["host"]["sha256"] != emulated["exact"]["sha256"]
    assert emulated["host"]["parity_passed"] is False
    assert "saturate" in emulated["host"]["likely_cause"]


@pytest.fixture(scope="module")
def native_training_digest() -> str:
    """The one-epoch digits training digest on this machine's own CPU (fresh process)."""
    here = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "emulated_cpu.py"), "train"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return json.loads(here.stdout.strip().splitlines()[-1])["sha256"]


@needs_qemu
@pytest.mark.parametrize("cpu", EMULATED_CPUS)
def test_training_gives_the_same_weights_on_intel_and_amd_avx2_cpus(cpu, native_training_digest):
    """Portable float kernels (harness.core.determinism): the trained model depends neither on the
    CPU's vector width nor on its vendor, so neither does anything measured on it. Both
    emulated CPUs are compared with the host, whichever vendor that is."""
    assert _emulated("train", cpu=cpu)["sha256"] == native_training_digest


def test_exact_profile_falls_back_to_int32_kernels_for_s8_activation_qoperator_graphs(tmp_path):
    """onnxruntime's exact path has no s8×s8 QLinearConv/QLinearMatMul kernel (NOT_IMPLEMENTED at
    load). The adapter then runs the default kernels and says so; those accumulate s8×s8
    products in int32 on every x86 CPU, so the numbers are the same here and, under emulation,
    on an AVX2-only CPU whose u8×s8 kernels saturate."""
    model, _ = _qoperator_model(tmp_path, "s8")
    model.metadata_props.add(
        key=METADATA_KEY, value=Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3).to_json()
    )
    path = tmp_path / "vendor-s8.onnx"
    onnx.save(model, str(path))
    images = np.random.default_rng(3).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    exact = RuntimeAdapter.from_path(path, kernel_profile="exact")
    host = RuntimeAdapter.from_path(path, kernel_profile="host")
    assert exact.kernel_note is not None and "s8×s8" in exact.kernel_note
    assert host.kernel_note is None
    native = exact.logits(images)
    np.testing.assert_array_equal(native, host.logits(images))
    assert np.ptp(native) > 0
    if QEMU is None:
        pytest.skip("qemu-user not installed: the AVX2 half of this check needs it")
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, images)
    emulated = _emulated("logits", str(path), str(pixels))
    assert emulated["exact"]["sha256"] == hashlib.sha256(native.tobytes()).hexdigest()
    assert emulated["host"]["sha256"] == emulated["exact"]["sha256"]
