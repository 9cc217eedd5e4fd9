"""INT8 kernel profiles: which integer arithmetic an onnxruntime session computes, as a setting.

The same INT8 ONNX file gives different numbers on different x86 CPUs. onnxruntime's u8×s8
kernels on x86 without VNNI (AVX2, AVX-512 without VNNI, SSE4.1) multiply with ``vpmaddubsw``,
which adds each *pair* of u8×s8 products into a saturating int16: 255·127 + 255·127 = 64 770
becomes 32 767. VNNI/AMX x86, Arm dot-product and most NPUs accumulate in int32 and never
saturate. So the CPU an auditor happens to own silently changes the deployed model under audit.

The harness therefore treats the kernel arithmetic as a named, recorded part of the deployment:

- ``exact`` (default): int32-exact accumulation — what VNNI/AMX x86, Arm and NPUs compute. On a
  host whose default kernels saturate, onnxruntime is switched to its exact path with the session
  config entry ``session.x64quantprecision = "1"`` (a level-2 graph transformer rewrites s8
  weights to u8 so the u8×u8 kernels, which widen to int16 before multiplying, are used). On a
  host that is already exact the entry changes nothing. Same config + seed ⇒ same INT8 numbers on
  any x86 CPU.
- ``host``: whatever this CPU's default kernels do (saturating on AVX2-only x86).

:func:`probe_host` *measures* which class the host's default kernels belong to by running tiny
graphs built to overflow int16 pair sums under both profiles and comparing with integer
arithmetic done in numpy — reading CPU flags alone would miss emulators, hypervisors masking
flags and future kernel changes. Every session in the harness is built by :func:`session_options`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from harness.core.errors import ModelError
from harness.core.kernel_profiles import DEFAULT_PROFILE, PROFILES, KernelProfile

__all__ = ["DEFAULT_PROFILE", "PROFILES", "KernelProfile"]


#: onnxruntime's ``kOrtSessionOptionsAvx2PrecisionMode`` (onnxruntime_session_options_config_keys.h)
PRECISION_MODE_KEY = "session.x64quantprecision"
EXACT = "int32-exact"
SATURATING = "int16-saturating"

#: Inner dimension of the probes: 64 products of 255·127 (or 127·127 for s8 activations);
#: the int32 sum is 2 072 640 while pairs saturated at 32 767 give at most 1 048 544.
_K = 64
_PROBE_IR_VERSION = 8
_PROBE_OPSET = 13


def check_profile(profile: str) -> KernelProfile:
    """``profile`` if it names a kernel profile, else a one-line error listing the choices."""
    for known in PROFILES:
        if profile == known:
            return known
    raise ModelError(f"unknown INT8 kernel profile {profile!r}; choose one of {list(PROFILES)}")


def session_config_entries(profile: str) -> dict[str, str]:
    """The onnxruntime session config entries that realise ``profile`` (recorded per run)."""
    return {PRECISION_MODE_KEY: "1"} if check_profile(profile) == "exact" else {}


def session_options(
    profile: str = DEFAULT_PROFILE, threads: int | None = None
) -> ort.SessionOptions:
    """Session options for every onnxruntime session the harness builds.

    ``threads`` None reads ``BLINDSPOTS_THREADS`` (0 = onnxruntime's default). The graph
    optimisation level is pinned to "all": the exact path is a level-2 transformer, and a lower
    level would also change which fused integer kernels run.
    """
    options = ort.SessionOptions()
    if threads is None:
        threads = int(os.environ.get("BLINDSPOTS_THREADS", "0"))
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in session_config_entries(profile).items():
        options.add_session_config_entry(key, value)
    return options


# ------------------------------------------------------------------------------------ host probe
@dataclass(frozen=True)
class Probe:
    """One probe graph, its input, and the output integer arithmetic without saturation gives."""

    name: str
    model: onnx.ModelProto
    feed: dict[str, np.ndarray]
    expected: np.ndarray


@dataclass(frozen=True)
class HostKernels:
    """What this host's INT8 kernels compute, measured by :func:`probe_host`.

    ``kernel_class`` is the class of the *default* kernels (the ``host`` profile); ``exact_verified``
    says the ``exact`` profile reproduced int32 arithmetic on every probe. ``outputs`` holds each
    probe's first output value per profile and the int32 reference, for the record.
    """

    kernel_class: str
    exact_verified: bool
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def profiles_differ(self) -> bool:
        """True when ``host`` and ``exact`` compute different numbers on this machine."""
        return self.kernel_class != EXACT

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "profiles_differ": self.profiles_differ}


def _model(
    nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "blindspots_int8_probe", inputs, outputs, inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _PROBE_OPSET)],
        ir_version=_PROBE_IR_VERSION,
    )


def _scalar(name: str, value: float | int, dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _qdq_probe(op: str) -> Probe:
    """u8 activations (code 255) × s8 weights (code 127) in a QDQ MatMul or 1×1 Conv.

    With an unquantized float output onnxruntime fuses the pattern into its integer kernels
    (MatMulIntegerToFloat / QLinearConv paths); scales of 1 make the float output the raw sum.
    """
    if op == "MatMul":
        x_shape, w = [1, _K], np.full((_K, 4), 127, np.int8)
        y_shape = [1, 4]
    else:  # 1×1 convolution over 64 channels: onnxruntime's symmetric-conv kernels
        x_shape, w = [1, _K, 1, 1], np.full((4, _K, 1, 1), 127, np.int8)
        y_shape = [1, 4, 1, 1]
    bound = float(2 * _K * 255 * 127)  # output quantizer range: no clipping of the exact sum
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zu"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zu"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "one", "zs"], ["wd"]),
        helper.make_node(op, ["xd", "wd"], ["acc"]),
        helper.make_node("QuantizeLinear", ["acc", "out_scale", "zu"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "out_scale", "zu"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        _scalar("one", 1.0, np.float32),
        _scalar("zu", 0, np.uint8),
        _scalar("zs", 0, np.int8),
        _scalar("out_scale", bound / 255.0, np.float32),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    scale = np.float32(bound / 255.0)
    code = np.clip(np.round(np.float32(_K * 255 * 127) / scale), 0, 255)
    expected = np.full(y_shape, code * scale, dtype=np.float32)
    return Probe(f"qdq_{op.lower()}", model, {"x": np.full(x_shape, 255.0, np.float32)}, expected)


def _dynamic_probe() -> Probe:
    """DynamicQuantizeLinear + MatMulInteger, as ``quantize_dynamic`` writes it (int32 output)."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.full((_K, 4), 127, np.int8), "w"),
        _scalar("wz", 0, np.int8),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        inits,
    )
    x = np.full((1, _K), 255.0, np.float32)
    x[0, 0] = 0.0  # range [0, 255] ⇒ scale 1, zero point 0: the codes equal the values
    expected = np.full((1, 4), (_K - 1) * 255 * 127, dtype=np.int32)
    return Probe("dynamic_matmulinteger", model, {"x": x}, expected)


def probes() -> list[Probe]:
    """The probe graphs: QDQ MatMul, QDQ Conv and dynamic MatMulInteger."""
    return [_qdq_probe("MatMul"), _qdq_probe("Conv"), _dynamic_probe()]


def _run_probe(probe: Probe, profile: str) -> np.ndarray:
    session = ort.InferenceSession(
        probe.model.SerializeToString(),
        sess_options=session_options(profile, threads=1),
        providers=["CPUExecutionProvider"],
    )
    return np.asarray(session.run(None, probe.feed)[0])


def _matches(value: np.ndarray, expected: np.ndarray) -> bool:
    """Equal up to one output quantization step (requantization may round differently)."""
    tolerance = 0.02 * float(np.abs(expected).max())
    return bool(np.allclose(value.astype(np.float64), expected.astype(np.float64), atol=tolerance))


@functools.cache
def probe_host() -> HostKernels:
    """Measure this host's INT8 kernel class (cached for the process; a few milliseconds)."""
    outputs: dict[str, dict[str, float]] = {}
    saturating = False
    exact_ok = True
    for probe in probes():
        host = _run_probe(probe, "host")
        exact = _run_probe(probe, "exact")
        outputs[probe.name] = {
            "int32_reference": float(probe.expected.flat[0]),
            "host": float(host.flat[0]),
            "exact": float(exact.flat[0]),
        }
        saturating |= not _matches(host, probe.expected)
        exact_ok &= _matches(exact, probe.expected)
    return HostKernels(SATURATING if saturating else EXACT, exact_ok, outputs)


def profile_record(profile: str) -> dict[str, Any]:
    """What a result computed under ``profile`` must carry: profile, host class, config entries."""
    host = probe_host()
    return {
        "profile": check_profile(profile),
        "host_kernel_class": host.kernel_class,
        "profiles_differ_on_host": host.profiles_differ,
        "exact_profile_verified": host.exact_verified,
        "session_config_entries": session_config_entries(profile),
    }


def other_profile(profile: str) -> KernelProfile:
    """The profile a drift measurement compares ``profile`` against."""
    return "host" if check_profile(profile) == "exact" else "exact"


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
"""x86 instruction sets that decide which INT8 kernels onnxruntime picks (recorded per run)."""


def cpu_isa_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool | None]:
    """Which INT8-relevant x86 instruction sets the CPU reports; None each when unknowable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return dict.fromkeys(ISA_FLAGS)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return {flag: flag in flags for flag in ISA_FLAGS}
    return dict.fromkeys(ISA_FLAGS)
