"""The runtime adapter: the only way metrics and defenses touch a model.

It wraps an ``onnxruntime.InferenceSession`` over the artifact that would ship (FP32, INT8 or
INT4 ONNX) and offers what a deployed model can give an auditor:

- ``logits`` / ``predict`` on uint8 (or float 0..255) NHWC pixel batches, with preprocessing
  read once from the model's metadata;
- ``activations`` of named intermediate layers (``penultimate``, ``last_conv``), always float,
  discovered by graph structure on every precision;
- ``with_channels_masked`` — a new adapter whose last-conv channels are zeroed by graph surgery;
- ``gradient_oracle`` — a differentiable torch replica built from this very graph.

Batching: onnxruntime's dynamic quantization computes activation scales over the whole batch,
so a sample's output depends on its batch-mates. ``per_sample="auto"`` therefore runs graphs
that contain ``DynamicQuantizeLinear`` one image at a time (as an edge device would) and batches
everything else. The adapter counts every image it forwards, so defenses can report queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from harness.artifacts.graph_inputs import (
    data_inputs,
    declared_batch,
    first_conv_kernel,
    image_input,
)
from harness.artifacts.graph_probe import (
    ProbePoint,
    add_probe_outputs,
    discover_layers,
    mask_channels,
)
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.artifacts.sidecar import sidecar_precision
from harness.core.errors import ModelError
from harness.runtime.kernels import DEFAULT_PROFILE, KernelProfile, check_profile, session_options
from harness.runtime.model_safety import load_untrusted
from harness.runtime.oracle import GradientOracle

PerSample = bool | Literal["auto"]


@dataclass
class QueryCounter:
    """Images forwarded through onnxruntime, shared by an adapter and its masked copies."""

    images: int = 0
    calls: int = 0


@dataclass
class RuntimeAdapter:
    """Query interface over one ONNX model as deployed.

    Build with :meth:`from_path` (or :meth:`from_model` for an in-memory graph).
    """

    model: onnx.ModelProto
    preprocessing: Preprocessing
    precision: str = "unknown"
    batch_size: int = 256
    per_sample: PerSample = "auto"
    threads: int | None = None
    kernel_profile: KernelProfile = DEFAULT_PROFILE
    source_path: Path | None = None
    counter: QueryCounter = field(default_factory=QueryCounter)
    probes: dict[str, ProbePoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_profile(self.kernel_profile)
        self.kernel_note: str | None = None
        if not self.probes:
            self.probes = discover_layers(self.model)
        self._input_name = image_input(self.model).name
        self._logits_name = self.model.graph.output[0].name
        self._session = self._make_session(self.model)
        self._probe_session: ort.InferenceSession | None = None
        self._has_dynamic_quant = any(
            n.op_type == "DynamicQuantizeLinear" for n in self.model.graph.node
        )
        self._oracle: GradientOracle | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_path(
        cls,
        path: str | Path,
        preprocessing: Preprocessing | None = None,
        precision: str | None = None,
        *,
        threads: int | None = None,
        kernel_profile: str = DEFAULT_PROFILE,
        batch_size: int = 256,
        per_sample: PerSample = "auto",
    ) -> RuntimeAdapter:
        """Load an ONNX file; preprocessing comes from its metadata unless given explicitly.

        Every file is read as untrusted (:func:`harness.runtime.model_safety.load_untrusted`): the
        runner's own artifacts pass its checks, and a file from anywhere else is refused in one
        line before onnxruntime parses it.
        """
        path = Path(path)
        model = load_untrusted(path)
        if precision is None:
            precision = sidecar_precision(path) or infer_precision(model)
        return cls.from_model(
            model,
            preprocessing,
            precision=precision,
            source_path=path,
            threads=threads,
            kernel_profile=kernel_profile,
            batch_size=batch_size,
            per_sample=per_sample,
        )

    @classmethod
    def from_model(
        cls,
        model: onnx.ModelProto,
        preprocessing: Preprocessing | None = None,
        *,
        precision: str = "unknown",
        threads: int | None = None,
        kernel_profile: str = DEFAULT_PROFILE,
        source_path: Path | None = None,
        batch_size: int = 256,
        per_sample: PerSample = "auto",
    ) -> RuntimeAdapter:
        """Wrap an in-memory ONNX model (``kernel_profile`` as configs spell it, checked here)."""
        if preprocessing is None:
            preprocessing = preprocessing_from_metadata(model)
        inputs = [value.name for value in data_inputs(model)]
        if len(inputs) != 1:
            raise ModelError(f"expected a model with one image input, found inputs {inputs}")
        return cls(
            model=model,
            preprocessing=preprocessing,
            precision=precision,
            batch_size=batch_size,
            per_sample=per_sample,
            threads=threads,
            kernel_profile=check_profile(kernel_profile),
            source_path=source_path,
        )

    def under_profile(self, profile: KernelProfile) -> RuntimeAdapter:
        """The same model in a new session under another INT8 kernel profile (own query count)."""
        return replace(self, kernel_profile=profile, counter=QueryCounter())

    def _make_session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        data = model.SerializeToString()
        try:
            return _session(data, self.kernel_profile, self.threads)
        except Exception as exc:  # ORT raises its own exception types
            first = str(exc).splitlines()[0]
        # onnxruntime's exact path rewrites s8 weights for u8 kernels; QOperator graphs with s8
        # *activations* (QLinearConv/QLinearMatMul s8×s8) have no such kernel and fail to load.
        # Their s8×s8 kernels accumulate in int32 on every x86 CPU (no vpmaddubsw), so the
        # default kernels are already exact for them: use those, and say so.
        if self.kernel_profile == "exact" and "NOT_IMPLEMENTED" in first:
            try:
                session = _session(data, "host", self.threads)
            except Exception:
                session = None
            if session is not None:
                self.kernel_note = (
                    "exact profile unavailable for this graph's s8×s8 integer ops; "
                    "onnxruntime's default int32 kernels run them"
                )
                return session
        raise ModelError(f"onnxruntime cannot load the model: {first}")

    # ------------------------------------------------------------------ queries
    @property
    def num_classes(self) -> int:
        """Width of the logits output (probed once on a blank image if the graph leaves it symbolic)."""
        dims = self.model.graph.output[0].type.tensor_type.shape.dim
        if dims and dims[-1].dim_value > 0:
            return int(dims[-1].dim_value)
        h, w, c = self.input_shape
        blank = np.zeros((1, h, w, c), dtype=np.uint8)
        return int(self._forward(self._session, [self._logits_name], blank, None)[0].shape[-1])

    @property
    def fixed_batch(self) -> int | None:
        """Batch size the graph declares for its input, when it fixes one (vendor exports often
        say 1 or 16); such graphs are fed exactly that many images per call, the last padded."""
        return declared_batch(image_input(self.model))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Static (H, W, C) expected by the model, where the graph declares it."""
        dims = [d.dim_value for d in image_input(self.model).type.tensor_type.shape.dim]
        if self.preprocessing.layout == "NCHW" and len(dims) == 4:
            return (dims[2], dims[3], dims[1])
        return tuple(dims[1:])

    def runs_per_sample(self, per_sample: PerSample | None) -> bool:
        mode = self.per_sample if per_sample is None else per_sample
        return self._has_dynamic_quant if mode == "auto" else bool(mode)

    def _forward(
        self,
        session: ort.InferenceSession,
        outputs: list[str],
        pixels: np.ndarray,
        per_sample: PerSample | None,
    ) -> list[np.ndarray]:
        if pixels.ndim != 4:
            raise ModelError(f"expected a batch of NHWC images, got shape {pixels.shape}")
        if pixels.dtype != np.uint8 and not np.issubdtype(pixels.dtype, np.floating):
            raise ModelError(f"expected uint8 or float pixels, got dtype {pixels.dtype}")
        fixed = self.fixed_batch
        step = fixed or (1 if self.runs_per_sample(per_sample) else self.batch_size)
        block_size = max(step, self.batch_size - self.batch_size % step)
        chunks: list[list[np.ndarray]] = [[] for _ in outputs]
        for block in range(0, len(pixels), block_size):
            # A whole batch is preprocessed at once even in per-sample mode: the per-image runs
            # then take contiguous views (no numpy calls per image), memory stays one batch.
            feed = self.preprocessing.apply(pixels[block : block + block_size])
            for start in range(0, len(feed), step):
                part = feed[start : start + step]
                real = len(part)
                if fixed and real < fixed:  # a graph with a fixed batch: pad the last call
                    padding = np.zeros((fixed - real, *part.shape[1:]), dtype=part.dtype)
                    part = np.concatenate([part, padding])
                try:
                    results = session.run(outputs, {self._input_name: part})
                except Exception as exc:  # onnxruntime's own exception types (bad shapes, ...)
                    expected = [
                        d.dim_value or d.dim_param
                        for d in image_input(self.model).type.tensor_type.shape.dim
                    ]
                    raise ModelError(
                        f"onnxruntime rejected input of shape {list(feed.shape)} "
                        f"(model expects {expected}): {str(exc).splitlines()[0][:200]}"
                    ) from exc
                self.counter.calls += 1
                for store, value in zip(chunks, results, strict=True):
                    store.append(value[:real] if fixed else value)
        self.counter.images += len(pixels)
        return [_join(parts) for parts in chunks]

    def logits(self, pixels: np.ndarray, per_sample: PerSample | None = None) -> np.ndarray:
        """Float32 logits ``(N, num_classes)`` for NHWC pixel images."""
        return self._forward(self._session, [self._logits_name], pixels, per_sample)[0].astype(
            np.float32, copy=False
        )

    def predict(self, pixels: np.ndarray, per_sample: PerSample | None = None) -> np.ndarray:
        """Top-1 labels ``(N,)``."""
        return self.logits(pixels, per_sample).argmax(axis=1)

    def probabilities(self, pixels: np.ndarray, per_sample: PerSample | None = None) -> np.ndarray:
        """Softmax of the logits (numerically stable)."""
        z = self.logits(pixels, per_sample)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    @property
    def layers(self) -> list[str]:
        """Names of the activations this graph exposes (``penultimate``, ``last_conv``)."""
        return sorted(self.probes)

    def activations(
        self,
        pixels: np.ndarray,
        layers: list[str] | None = None,
        per_sample: PerSample | None = None,
    ) -> dict[str, np.ndarray]:
        """Float32 activations of the named layers (all discovered ones by default)."""
        layers = self.layers if layers is None else layers
        missing = [name for name in layers if name not in self.probes]
        if missing:
            raise ModelError(
                f"layer(s) {missing} not found in this graph; available: {self.layers}"
            )
        if self._probe_session is None:
            probed = add_probe_outputs(self.model, list(self.probes.values()))
            self._probe_session = self._make_session(probed)
        probes = [self.probes[name] for name in layers]
        raw = self._forward(self._probe_session, [p.tensor for p in probes], pixels, per_sample)
        return {p.layer: p.decode(r) for p, r in zip(probes, raw, strict=True)}

    @property
    def last_conv_channels(self) -> int:
        """Channel count of the last convolutional feature map."""
        if "last_conv" not in self.probes:
            raise ModelError("this graph exposes no last_conv layer")
        h, w, c = self.input_shape
        return int(
            self.activations(np.zeros((1, h, w, c), np.uint8), ["last_conv"])["last_conv"].shape[1]
        )

    def with_channels_masked(self, keep: np.ndarray) -> RuntimeAdapter:
        """New adapter whose ``last_conv`` channels are zero where ``keep`` is False.

        The mask is graph surgery on this artifact (see
        :func:`harness.artifacts.graph_probe.mask_channels`),
        so the pruned model is evaluated with the deployed arithmetic. Queries share this
        adapter's counter.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.ndim != 1 or len(keep) != self.last_conv_channels:
            raise ModelError(
                f"channel mask must have {self.last_conv_channels} entries, got shape {keep.shape}"
            )
        masked_model, masked_probe = mask_channels(self.model, self.probes["last_conv"], keep)
        probes = dict(self.probes)
        probes["last_conv"] = masked_probe
        return RuntimeAdapter(
            model=masked_model,
            preprocessing=self.preprocessing,
            precision=self.precision,
            batch_size=self.batch_size,
            per_sample=self.per_sample,
            threads=self.threads,
            kernel_profile=self.kernel_profile,
            source_path=None,
            counter=self.counter,
            probes=probes,
        )

    def input_conv_kernel(self) -> np.ndarray | None:
        """Weights (units, C, kh, kw) of the Conv that reads the image, where the graph has one:
        what a defense may know of the first layer without parsing the file itself."""
        return first_conv_kernel(self.model)

    def gradient_oracle(self) -> GradientOracle:
        """Differentiable torch replica of this graph (built once; see :mod:`harness.replica.interpreter`)."""
        if self._oracle is None:
            self._oracle = GradientOracle(self)
        return self._oracle


def _session(data: bytes, profile: str, threads: int | None) -> ort.InferenceSession:
    return ort.InferenceSession(
        data, sess_options=session_options(profile, threads), providers=["CPUExecutionProvider"]
    )


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """One array from per-run outputs; a single run's output is returned as is (no copy)."""
    if not parts:
        return np.empty((0,))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def preprocessing_from_metadata(model: onnx.ModelProto) -> Preprocessing:
    """Read the preprocessing the exporter stored, or fail naming the missing key."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return Preprocessing.from_json(prop.value)
    raise ModelError(
        f"the model carries no '{METADATA_KEY}' metadata; pass the preprocessing explicitly "
        "(e.g. --mean/--std) for models not exported by blindspots"
    )


def infer_precision(model: onnx.ModelProto) -> str:
    """Best guess of the precision from the ops and initializer types in the graph."""
    ops = {n.op_type for n in model.graph.node}
    types = {init.data_type for init in model.graph.initializer}
    if "DynamicQuantizeLinear" in ops:
        return "int8-dynamic"
    if onnx.TensorProto.INT4 in types or onnx.TensorProto.UINT4 in types:
        return "int4"
    if "DequantizeLinear" in ops or "QLinearConv" in ops:
        return "int8-static"
    return "fp32"
