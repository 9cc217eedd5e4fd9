"""``load_untrusted`` refuses hostile and broken ONNX files in one line, and accepts real ones.

The model an auditor receives comes from the party being audited (issue #7). Every file here is
built in the test: a tiny Flatten→Gemm classifier, then broken in one specific way. Each refusal
must be a ModelError whose message is one line, starts with the file name and names the problem;
no file outside the model's folder may ever be opened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from onnxruntime.quantization import QuantType, quantize_dynamic

from harness.core.errors import ModelError
from harness.runtime.model_safety import MAX_DIM, load_untrusted, runtime_limits

OPSET = 13
IR_VERSION = 8
CLASSES = 10
SHAPE = [3, 4, 4]


def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((48, CLASSES)).astype(np.float32)


def tiny_model(
    *,
    nodes: list[onnx.NodeProto] | None = None,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    opsets: list[onnx.OperatorSetIdProto] | None = None,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """pixels (N,3,4,4) → Flatten → Gemm(W, b) → logits (N,10); each part replaceable."""
    if nodes is None:
        nodes = [
            helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], name="fc"),
        ]
    if inputs is None:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])]
    if outputs is None:
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    if initializers is None:
        initializers = [
            numpy_helper.from_array(weights(), "W"),
            numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b"),
        ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    return helper.make_model(
        graph,
        opset_imports=opsets or [helper.make_opsetid("", OPSET)],
        ir_version=ir_version,
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def with_external_weight(folder: Path, location: str, *, length: int | None = None) -> Path:
    """The tiny model with ``W`` stored externally at ``location`` (written by the caller)."""
    model = tiny_model()
    weight = model.graph.initializer[0]
    set_external_data(weight, location, offset=0, length=length or len(weight.raw_data))
    weight.ClearField("raw_data")
    return save(model, folder / "model.onnx")


def assert_refused(path: Path, *fragments: str, **limits: int) -> str:
    """``load_untrusted(path)`` raises a one-line ModelError naming the file and each fragment."""
    with pytest.raises(ModelError) as info:
        load_untrusted(path, **limits)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path.name}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- accepted models


def test_a_valid_model_loads_unchanged(tmp_path: Path) -> None:
    model = tiny_model()
    loaded = load_untrusted(save(model, tmp_path / "ok.onnx"))
    assert loaded.SerializeToString() == model.SerializeToString()


def test_in_folder_external_weights_are_loaded(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(weights().tobytes())
    loaded = load_untrusted(with_external_weight(tmp_path, "weights.bin"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights())
    assert not loaded.graph.initializer[0].external_data  # fully in memory


def test_external_weights_in_a_subfolder_are_loaded(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.bin").write_bytes(weights().tobytes())
    loaded = load_untrusted(with_external_weight(tmp_path, "data/w.bin"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights())


def test_onnxruntime_dynamic_int8_and_com_microsoft_ops_are_accepted(tmp_path: Path) -> None:
    src = save(tiny_model(), tmp_path / "fp32.onnx")
    dst = tmp_path / "int8.onnx"
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    assert any(n.op_type == "MatMulInteger" for n in load_untrusted(dst).graph.node)

    gelu = tiny_model(
        nodes=[
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "b"], ["pre"]),
            helper.make_node("Gelu", ["pre"], ["logits"], domain="com.microsoft"),
        ],
        opsets=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    assert load_untrusted(save(gelu, tmp_path / "gelu.onnx")).graph.node[2].domain == (
        "com.microsoft"
    )


# --------------------------------------------------------------------------- hostile files

Builder = Callable[[Path], Path]


def _bytes(data: bytes) -> Builder:
    return lambda folder: _write(folder / "model.onnx", data)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _model(**parts: object) -> Builder:
    return lambda folder: save(tiny_model(**parts), folder / "model.onnx")  # type: ignore[arg-type]


def _truncated(folder: Path) -> Path:
    data = tiny_model().SerializeToString()
    return _write(folder / "model.onnx", data[: len(data) // 2])


def _external(location: str, *, length: int | None = None) -> Builder:
    def build(folder: Path) -> Path:
        model_folder = folder / "m"
        model_folder.mkdir()
        (folder / "secret.bin").write_bytes(weights().tobytes())
        (model_folder / "w.bin").write_bytes(weights().tobytes())
        return with_external_weight(model_folder, location.format(folder=folder), length=length)

    return build


def _symlinked_outside(folder: Path) -> Path:
    path = _external("w.bin")(folder)
    (path.parent / "w.bin").unlink()
    (path.parent / "w.bin").symlink_to(folder / "secret.bin")
    return path


def _symlinked_inside(folder: Path) -> Path:
    path = _external("link.bin")(folder)
    (path.parent / "link.bin").symlink_to(path.parent / "w.bin")
    return path


def _hard_linked(folder: Path) -> Path:
    path = _external("w.bin")(folder)
    (path.parent / "w.bin").unlink()
    os.link(folder / "secret.bin", path.parent / "w.bin")
    return path


def _weight_with(value: float) -> list[TensorProto]:
    w = weights()
    w[3, 7] = value
    return [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b"),
    ]


def _declared_only(name: str, dims: list[int], data_type: int = TensorProto.FLOAT) -> TensorProto:
    """A tensor whose header declares ``dims`` but which carries just 4 bytes."""
    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.raw_data = bytes(4)
    return tensor


def _image(shape: list[object], name: str = "x") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _flatten_gemm_with(extra: onnx.NodeProto) -> list[onnx.NodeProto]:
    return [
        extra,
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
    ]


def _if_node() -> onnx.NodeProto:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [CLASSES])],
    )
    return helper.make_node(
        "If", ["cond"], ["chosen"], then_branch=branch, else_branch=branch, name="gate"
    )


def _with_function(folder: Path) -> Path:
    model = tiny_model()
    model.functions.append(
        helper.make_function("my.funcs", "Double", ["a"], ["b"], [], [helper.make_opsetid("", 13)])
    )
    return save(model, folder / "model.onnx")


def _constant_of_shape_bomb() -> Builder:
    """A ConstantOfShape of 2**40 zeros: onnxruntime would fold it while building a session."""
    shape = numpy_helper.from_array(np.array([MAX_DIM, MAX_DIM], np.int64), "shape")
    return _model(
        nodes=_flatten_gemm_with(helper.make_node("ConstantOfShape", ["shape"], ["big"])),
        initializers=[*_weight_with(0.0), shape],
    )


def _invalid_utf8_name(folder: Path) -> Path:
    data = tiny_model().SerializeToString()
    return _write(folder / "model.onnx", data.replace(b"flatten", b"fla\xfften"))


def _unknown_external_key(folder: Path) -> Path:
    path = _external("w.bin")(folder)
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data.add(key="exec", value="rm -rf /")
    return save(model, path)


def _no_graph(folder: Path) -> Path:
    return _write(folder / "model.onnx", onnx.ModelProto(ir_version=IR_VERSION).SerializeToString())


HOSTILE: dict[str, tuple[Builder, tuple[str, ...]]] = {
    "empty file": (_bytes(b""), ("empty",)),
    "random bytes": (_bytes(bytes(range(256)) * 4), ("not a valid ONNX protobuf",)),
    "truncated file": (_truncated, ("not a valid ONNX protobuf",)),
    "model without a graph": (_no_graph, ("holds no graph",)),
    "external ../": (_external("../secret.bin"), ("'../secret.bin'", "'..'")),
    "external absolute": (_external("{folder}/secret.bin"), ("absolute path",)),
    "external symlink outside": (_symlinked_outside, ("'w.bin'", "outside the model's folder")),
    "external symlink inside": (_symlinked_inside, ("'link.bin'", "symlink")),
    "external hard link": (_hard_linked, ("'w.bin'", "2 hard links")),
    "external missing": (_external("gone.bin"), ("'gone.bin'", "does not exist")),
    "external length beyond file": (
        _external("w.bin", length=10_000),
        ("'W'", "0..10,000", "1,920 bytes"),
    ),
    "external unknown key": (_unknown_external_key, ("'W'", "unknown external data key 'exec'")),
    "name not UTF-8": (_invalid_utf8_name, ("not valid UTF-8", "NodeProto.name")),
    "huge declared input dim": (
        _model(inputs=[_image(["N", 3, MAX_DIM + 1, 4])]),
        ("'x'", f"dimension {MAX_DIM + 1}"),
    ),
    "huge image": (_model(inputs=[_image(["N", 3, 8192, 8192])]), ("elements per image",)),
    "zero-size input dim": (_model(inputs=[_image(["N", 3, 0, 4])]), ("zero-size", "'x'")),
    "huge declared initializer": (
        _model(initializers=[_declared_only("W", [1024, 1024, 1024])]),
        ("'W'", "4,294,967,296 bytes"),
    ),
    "initializer dim over limit": (
        _model(initializers=[_declared_only("W", [MAX_DIM * 2])]),
        ("'W'", "dimensions must lie in"),
    ),
    "unknown tensor data type": (
        _model(initializers=[_declared_only("W", [1], data_type=99)]),
        ("'W'", "unknown data type 99"),
    ),
    "ConstantOfShape bomb": (
        _constant_of_shape_bomb(),
        ("'big'", f"would have shape [{MAX_DIM}, {MAX_DIM}]"),
    ),
    "NaN weights": (_model(initializers=_weight_with(np.nan)), ("'W'", "non-finite", "1 ")),
    "Inf weights": (_model(initializers=_weight_with(-np.inf)), ("'W'", "non-finite")),
    "vendor domain op": (
        _model(
            nodes=_flatten_gemm_with(
                helper.make_node("Steal", ["x"], ["y"], domain="com.vendor", name="evil")
            ),
            opsets=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.vendor", 1)],
        ),
        ("'com.vendor'", "'Steal'", "'evil'"),
    ),
    "ai.onnx.ml op": (
        _model(
            nodes=_flatten_gemm_with(
                helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml")
            ),
            opsets=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 3)],
        ),
        ("'ai.onnx.ml'", "'Normalizer'"),
    ),
    "control-flow subgraph": (
        _model(nodes=_flatten_gemm_with(_if_node())),
        ("'gate'", "'If'", "control-flow subgraph"),
    ),
    "local function": (_with_function, ("local function", "'Double'")),
    "two image inputs": (
        _model(inputs=[_image(["N", *SHAPE]), _image(["N", *SHAPE], "x2")]),
        ("2 graph inputs", "'x'", "'x2'"),
    ),
    "no inputs": (_model(inputs=[]), ("no graph input",)),
    "no outputs": (_model(outputs=[]), ("no graph output",)),
    "checker-invalid node": (
        _model(nodes=_flatten_gemm_with(helper.make_node("Relu", ["x", "x"], ["y"]))),
        ("fails the ONNX checker", "Relu"),
    ),
    "unknown op type": (
        _model(nodes=_flatten_gemm_with(helper.make_node("FrobnicateConv", ["x"], ["y"]))),
        ("fails the ONNX checker", "FrobnicateConv"),
    ),
    "Flatten with no inputs": (
        _model(nodes=_flatten_gemm_with(helper.make_node("Flatten", [], ["y"]))),
        ("fails the ONNX checker", "Flatten"),
    ),
    "DequantizeLinear without scale": (
        _model(nodes=_flatten_gemm_with(helper.make_node("DequantizeLinear", ["x"], ["y"]))),
        ("fails the ONNX checker", "DequantizeLinear"),
    ),
    "IR version too new": (_model(ir_version=99), ("IR version 99", "loads up to IR version")),
    "IR version missing": (_model(ir_version=0), ("IR version 0",)),
    "opset too new": (
        _model(opsets=[helper.make_opsetid("", 99)]),
        ("opset 99", "supports up to opset"),
    ),
    "newline in a node name": (
        _model(
            nodes=_flatten_gemm_with(
                helper.make_node("Steal", ["x"], ["y"], domain="x.y", name="a\nb\r\nc")
            )
        ),
        ("'x.y'", r"'a\nb\r\nc'"),
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_is_refused_in_one_line_naming_the_problem(tmp_path: Path, case: str) -> None:
    build, fragments = HOSTILE[case]
    assert_refused(build(tmp_path), *fragments)


def test_file_over_max_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = save(tiny_model(), tmp_path / "big.onnx")
    assert_refused(path, f"{path.stat().st_size:,} bytes", "1,000-byte limit", max_bytes=1000)


def test_external_data_over_max_external_bytes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(weights().tobytes())
    path = with_external_weight(tmp_path, "w.bin")
    assert_refused(path, "'W'", "1,000-byte limit", max_external_bytes=1000)


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nowhere.onnx", "not found")
    (tmp_path / "dir.onnx").mkdir()
    assert_refused(tmp_path / "dir.onnx", "is a folder")


def test_versions_just_past_what_onnxruntime_loads_are_refused(tmp_path: Path) -> None:
    """onnx's checker may accept an IR version or opset the installed onnxruntime cannot load
    (onnx 1.23 knows IR 14 and opset 28; onnxruntime 1.31 loads IR 13 and opset 26)."""
    max_ir, max_opset = runtime_limits()
    assert max_ir >= 8 and max_opset >= 17  # the project's own exports use these
    at_limit = tiny_model(ir_version=max_ir, opsets=[helper.make_opsetid("", max_opset)])
    assert load_untrusted(save(at_limit, tmp_path / "limit.onnx"))
    newer_ir = save(tiny_model(ir_version=max_ir + 1), tmp_path / "ir.onnx")
    assert_refused(newer_ir, f"IR version {max_ir + 1}", f"up to IR version {max_ir}")
    newer_opset = save(
        tiny_model(opsets=[helper.make_opsetid("", max_opset + 1)]), tmp_path / "opset.onnx"
    )
    assert_refused(newer_opset, f"opset {max_opset + 1}", f"up to opset {max_opset}")


# --------------------------------------------------------------------------- nothing opened outside


class OpenRecorder:
    """Real paths of the files Python opens while :meth:`recording` is active.

    An audit hook cannot be removed once added, so a single one serves the whole session and
    does nothing unless a test is recording.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.active = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.path.realpath(os.fsdecode(args[0])))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[str]]:
        self.paths, self.active = [], True
        try:
            yield self.paths
        finally:
            self.active = False


@functools.cache
def open_recorder() -> OpenRecorder:
    return OpenRecorder()


@pytest.mark.parametrize(
    "build",
    [_external("../secret.bin"), _external("{folder}/secret.bin"), _symlinked_outside],
    ids=["dotdot", "absolute", "symlink"],
)
def test_no_file_outside_the_model_folder_is_opened(tmp_path: Path, build: Builder) -> None:
    """Python-level opens are audited; the refusal comes before onnx's own (C++) reader runs."""
    path = build(tmp_path)
    with open_recorder().recording() as opened, pytest.raises(ModelError):
        load_untrusted(path)
    assert os.path.realpath(path) in opened  # the hook does see the loader's own reads
    assert os.path.realpath(tmp_path / "secret.bin") not in opened
    folder = os.path.realpath(path.parent)
    root = os.path.realpath(tmp_path)
    assert all(p.startswith(folder + os.sep) or not p.startswith(root) for p in opened)


# --------------------------------------------------------------------------- fuzz


# Small weights, so that most mutated bytes land in the graph's structure, not in weight data.
VALID = tiny_model(
    inputs=[_image(["N", 1, 2, 2])],
    outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    initializers=[
        numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ],
).SerializeToString()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    patches=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=4)),
        min_size=1,
        max_size=4,
    ),
    truncate=st.booleans(),
    keep=st.integers(1, len(VALID)),
)
def test_mutated_bytes_load_or_fail_with_one_line(
    tmp_path: Path, patches: list[tuple[int, bytes]], truncate: bool, keep: int
) -> None:
    """Overwrite a few short runs of bytes (and sometimes cut the file): names become invalid
    UTF-8, types and dims change, fields appear; every outcome is a model or a ModelError."""
    data = bytearray(VALID)
    for position, patch in patches:
        data[position : position + len(patch)] = patch
    path = _write(tmp_path / "fuzz.onnx", bytes(data[:keep] if truncate else data))
    assert load_untrusted(_write(tmp_path / "base.onnx", VALID))  # the unmutated base loads
    try:
        model = load_untrusted(path)
    except ModelError as exc:
        assert re.fullmatch(r"fuzz\.onnx: [^\n\r]+", str(exc)), str(exc)
    else:
        assert isinstance(model, onnx.ModelProto) and len(model.graph.input) >= 1
