"""Reading an auditor's ONNX file, which is untrusted input (issue #7).

The model an auditor receives comes from the party being audited. The file may be broken by
accident or crafted on purpose: a protobuf declaring terabyte-sized tensors, external-data
references pointing at ``/etc/shadow`` or ``../../home``, a symlink planted next to the model,
NaN weights that turn every metric into noise, vendor-domain operators, or control flow that an
image classifier has no use for. :func:`load_untrusted` is the one way such a file is read. It
refuses each of these with a one-line :class:`~harness.core.errors.ModelError` starting with the
file
name, and it never runs the model, never unpickles and never opens a file outside the model's
own folder.

The checks run cheapest and most dangerous first, so nothing large is allocated and nothing
outside the folder is touched before the declarations that would cause it are vetted:

1. the file's size, before a byte is read;
2. protobuf parsing with ``load_external_data=False`` (no other file is opened);
3. static checks on the parsed message: an IR version and opset the installed onnxruntime
   loads, allowed operator domains, no control-flow subgraphs, local functions or sparse
   tensors, exactly one image input and at least one output, sane declared shapes and tensor
   sizes;
4. external-data references: their text (relative, no ``..``), then where they resolve on disk
   (inside the folder, a regular file, not a symlink, one hard link) and their declared byte
   ranges against the real file size and the limit;
5. loading that vetted in-folder data with onnx's own helper (which re-checks containment);
6. ``onnx.checker.check_model`` and strict shape inference (with data propagation) on the
   complete in-memory model, refusing intermediate tensors of absurd size: onnxruntime folds
   constants when it builds a session, so a ``ConstantOfShape`` of 2**40 elements would
   exhaust memory before the model ever runs;
7. no NaN/Inf in float weights, which would make every logit NaN.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from onnx.external_data_helper import (
    ExternalDataInfo,
    load_external_data_for_model,
    uses_external_data,
)

from harness.core.errors import ModelError, one_line
from harness.runtime.kernels import session_options

DEFAULT_MAX_BYTES = 1 << 30
"""Largest model file read (1 GiB): the protobuf part of any image classifier fits easily."""

DEFAULT_MAX_EXTERNAL_BYTES = 1 << 30
"""Largest total of external-data bytes read, summed over every external tensor."""

PROTOBUF_LIMIT = (1 << 31) - 1
"""protobuf cannot serialize a larger message, and the adapter hands onnxruntime the bytes."""

MAX_DIM = 1 << 20
"""Largest declared dimension; anything bigger is an allocation attack, not an image model."""

MAX_INPUT_ELEMENTS = 1 << 26
"""Largest declared number of input elements per image (e.g. 3×4096×4096 fits, barely)."""

MAX_TENSOR_ELEMENTS = 1 << 30
"""Largest number of elements an inferred intermediate tensor may have (unknown dims count 1)."""

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
"""Operator domains accepted; the replica and adapter decide later which com.microsoft ops
they support. Anything else (ai.onnx.ml, vendor domains) names kernels an auditor never chose."""

MIN_IR_VERSION = 3
"""Earliest IR version onnxruntime loads (IR 1-2 predate opset imports)."""

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)
"""Tensor types whose weights are checked for NaN/Inf."""

EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
"""The keys the ONNX spec defines for an external-data entry; any other key is refused."""

_GRAPH_TYPES = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
_SPARSE_TYPES = (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS)
_NAME_LIMIT = 80
_DETAIL_LIMIT = 300
_PROBE_OPSET = 13


def describe_refusal(path: str | Path, problem: str) -> str:
    """The one-line message for refusing ``path``: the file name, then the problem.

    Text from the file (tensor names, checker output) may hold newlines; they are squeezed so
    the CLI always prints exactly one line.
    """
    return " ".join(f"{Path(path).name}: {problem}".split())


def load_untrusted(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_external_bytes: int = DEFAULT_MAX_EXTERNAL_BYTES,
) -> onnx.ModelProto:
    """Read the ONNX model at ``path`` that an auditor received, refusing anything hostile.

    Returns the model with any in-folder external data loaded into memory. Raises
    :class:`ModelError` (one line, starting with the file name) for every refusal; see the
    module docstring for the checks and their order.
    """
    model, _ = load_untrusted_hashed(
        path, max_bytes=max_bytes, max_external_bytes=max_external_bytes
    )
    return model


def load_untrusted_hashed(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_external_bytes: int = DEFAULT_MAX_EXTERNAL_BYTES,
) -> tuple[onnx.ModelProto, str]:
    """:func:`load_untrusted` plus the SHA-256 of the very bytes that were checked and parsed.

    An audit records the hash of the file it audited; hashing the bytes already read (not the
    file a second time) means the hash cannot describe a file swapped in between.
    """
    path = Path(path)
    data = _read_bounded(path, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    model = _parse(path, data)
    del data
    _check_versions(path, model)
    _check_constructs(path, model)
    image_input = _check_inputs_and_outputs(path, model.graph)
    _check_declared_shapes(path, model.graph)
    _check_image_input(path, image_input)
    tensors = list(_tensors(model.graph))
    _check_tensor_sizes(path, tensors, max_bytes, max_external_bytes)
    _check_external_references(path, tensors, max_external_bytes)
    _load_external_data(path, model)
    _check_inferred_shapes(path, _run_checker(path, model))
    _check_finite(path, tensors)
    return model, digest


@functools.cache
def runtime_limits() -> tuple[int, int]:
    """Highest IR version and ai.onnx opset the installed onnxruntime loads, measured once.

    Asking onnxruntime itself (on a one-node graph built here) keeps this right across
    onnxruntime upgrades, where a hard-coded table would silently go stale.
    """
    max_ir = next(
        (
            ir
            for ir in range(onnx.IR_VERSION, MIN_IR_VERSION - 1, -1)
            if _ort_loads(ir, _PROBE_OPSET)
        ),
        onnx.IR_VERSION,
    )
    max_opset = next(
        (
            v
            for v in range(onnx.defs.onnx_opset_version(), _PROBE_OPSET, -1)
            if _ort_loads(max_ir, v)
        ),
        _PROBE_OPSET,
    )
    return max_ir, max_opset


def _ort_loads(ir_version: int, opset: int) -> bool:
    """Whether onnxruntime builds a session for an Identity graph stamped with these versions."""
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [out])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    try:
        ort.InferenceSession(
            model.SerializeToString(),
            sess_options=session_options(threads=1),
            providers=["CPUExecutionProvider"],
        )
    except Exception:  # onnxruntime's exception types are not exported; any failure means "no"
        return False
    return True


# --------------------------------------------------------------------------- reading


def _refuse(path: Path, problem: str) -> ModelError:
    return ModelError(describe_refusal(path, problem))


def _quote(text: str) -> str:
    """A name from the file, quoted with escapes and cut short (hostile names can be huge)."""
    return repr(text if len(text) <= _NAME_LIMIT else text[:_NAME_LIMIT] + "...")


def _detail(exc: BaseException) -> str:
    """A library error's message on one line, cut short (hostile files make huge ones)."""
    return one_line(exc, limit=_DETAIL_LIMIT)


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refusing folders, devices, empty files and files over ``max_bytes``.

    The size is checked before reading and again while reading, so a file that grows in
    between (or a /proc-style file reporting size 0) still cannot exceed the limit.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _refuse(path, f"model file not found ({path})") from None
    except OSError as exc:
        raise _refuse(path, f"cannot read the model file: {_detail(exc)}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise _refuse(path, f"{path} is a folder, not an ONNX model file")
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, "is not a regular file")
    if info.st_size == 0:
        raise _refuse(path, "is empty (0 bytes), not an ONNX model")
    if info.st_size > max_bytes:
        raise _refuse(path, f"is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit")
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise _refuse(path, f"cannot read the model file: {_detail(exc)}") from exc
    if len(data) > max_bytes:
        raise _refuse(path, f"grew past the {max_bytes:,}-byte limit while being read")
    if not data:
        raise _refuse(path, "is empty (0 bytes), not an ONNX model")
    return data


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    """Decode the protobuf; external data is deliberately left unloaded (and unopened)."""
    try:
        model = onnx.load(io.BytesIO(data), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as exc:
        raise _refuse(path, f"is not a valid ONNX protobuf: {_detail(exc)}") from exc
    if not model.HasField("graph"):
        raise _refuse(path, "holds no graph (not an ONNX model, or truncated)")
    field = _non_utf8_field(model)
    if field:
        raise _refuse(path, f"holds text that is not valid UTF-8 (in a {field} field)")
    return model


def _non_utf8_field(message: Message) -> str | None:
    """The first string field whose bytes are not UTF-8, as ``Message.field``, else None.

    protobuf does not validate ONNX's (proto2) strings when parsing; it hands such values
    back as ``bytes``, which would break every later check that treats names as text.
    """
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                return f"{message.DESCRIPTOR.name}.{field.name}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                found = _non_utf8_field(item)
                if found:
                    return found
    return None


# --------------------------------------------------------------------------- static checks


def _check_versions(path: Path, model: onnx.ModelProto) -> None:
    """Refuse IR versions and ai.onnx opsets the installed onnxruntime cannot load."""
    max_ir, max_opset = runtime_limits()
    if model.ir_version < MIN_IR_VERSION:
        raise _refuse(
            path,
            f"declares IR version {model.ir_version}; onnxruntime needs {MIN_IR_VERSION} or later",
        )
    if model.ir_version > max_ir:
        raise _refuse(
            path,
            f"declares IR version {model.ir_version}; the installed onnxruntime "
            f"{ort.__version__} loads up to IR version {max_ir}",
        )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise _refuse(
                path,
                f"imports ai.onnx opset {opset.version}; the installed onnxruntime "
                f"{ort.__version__} supports up to opset {max_opset}",
            )


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = _quote(node.name) if node.name else f"#{index}"
    return f"node {name} ({_quote(node.op_type)})"


def _check_constructs(path: Path, model: onnx.ModelProto) -> None:
    """Refuse what an image classifier never needs and an attacker might hide things in."""
    if model.functions:
        names = ", ".join(_quote(f.name) for f in model.functions[:3])
        raise _refuse(path, f"defines {len(model.functions)} local function(s) ({names}); refused")
    if model.training_info:
        raise _refuse(path, "carries training_info graphs; an image classifier needs none")
    if model.graph.sparse_initializer:
        raise _refuse(path, "holds sparse initializers; an image classifier needs none")
    for index, node in enumerate(model.graph.node):
        _check_node(path, node, index)


def _check_node(path: Path, node: onnx.NodeProto, index: int) -> None:
    """An allowed operator domain, and no subgraph or sparse tensor in any attribute.

    Both the declared attribute type and the fields actually set are checked: a hostile file
    can set ``g`` on an attribute that claims to be a float.
    """
    if node.domain not in ALLOWED_DOMAINS:
        raise _refuse(
            path,
            f"{_node_label(node, index)} uses operator domain {_quote(node.domain)}; "
            "allowed domains are ai.onnx and com.microsoft",
        )
    for attr in node.attribute:
        if attr.type in _GRAPH_TYPES or attr.HasField("g") or attr.graphs:
            raise _refuse(
                path,
                f"{_node_label(node, index)} holds a control-flow subgraph (attribute "
                f"{_quote(attr.name)}); an image classifier needs none",
            )
        if attr.type in _SPARSE_TYPES or attr.HasField("sparse_tensor") or attr.sparse_tensors:
            raise _refuse(
                path,
                f"{_node_label(node, index)} holds a sparse tensor attribute "
                f"{_quote(attr.name)}; an image classifier needs none",
            )


def _check_inputs_and_outputs(path: Path, graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The single image input (initializers listed as inputs by old exporters don't count)."""
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs:
        raise _refuse(path, "declares no graph input; an image classifier takes one image input")
    if len(inputs) > 1:
        names = ", ".join(_quote(i.name) for i in inputs[:4])
        raise _refuse(
            path,
            f"declares {len(inputs)} graph inputs ({names}); an image classifier takes "
            "exactly one image input",
        )
    if not graph.output:
        raise _refuse(path, "declares no graph output; an image classifier must output logits")
    return inputs[0]


def _shape_text(dims: Iterable[onnx.TensorShapeProto.Dimension]) -> str:
    """A declared shape for messages: sizes as numbers, symbolic names quoted, unknown as ?."""
    parts = [
        str(d.dim_value) if d.HasField("dim_value") else _quote(d.dim_param) if d.dim_param else "?"
        for d in dims
    ]
    return "[" + ", ".join(parts) + "]"


def _check_declared_shapes(path: Path, graph: onnx.GraphProto) -> None:
    """Refuse negative or absurd dimensions anywhere a shape is declared."""
    for kind, values in (
        ("input", graph.input),
        ("output", graph.output),
        ("value", graph.value_info),
    ):
        for value in values:
            if value.type.WhichOneof("value") != "tensor_type":
                continue
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and not 0 <= dim.dim_value <= MAX_DIM:
                    raise _refuse(
                        path,
                        f"{kind} {_quote(value.name)} declares dimension {dim.dim_value} "
                        f"(shape {_shape_text(value.type.tensor_type.shape.dim)}); "
                        f"dimensions must lie in 0..{MAX_DIM}",
                    )


def _check_image_input(path: Path, value: onnx.ValueInfoProto) -> None:
    """The image input must be a tensor with no zero-size dimension and a sane image size."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise _refuse(path, f"image input {_quote(value.name)} is not a tensor")
    dims = value.type.tensor_type.shape.dim
    if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
        raise _refuse(
            path,
            f"image input {_quote(value.name)} declares a zero-size dimension "
            f"(shape {_shape_text(dims)})",
        )
    per_image = math.prod(d.dim_value for d in dims[1:] if d.HasField("dim_value"))
    if per_image > MAX_INPUT_ELEMENTS:
        raise _refuse(
            path,
            f"image input {_quote(value.name)} declares {per_image:,} elements per image "
            f"(shape {_shape_text(dims)}); at most {MAX_INPUT_ELEMENTS:,} are accepted",
        )


def _tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor the graph carries, labelled for messages.

    Subgraphs, functions and sparse tensors are refused before this runs, so initializers and
    node attribute tensors (e.g. ``Constant``) are all there is.
    """
    for tensor in graph.initializer:
        yield f"initializer {_quote(tensor.name)}", tensor
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            label = f"attribute {_quote(attr.name)} of {_node_label(node, index)}"
            if attr.HasField("t"):
                yield label, attr.t
            for tensor in attr.tensors:
                yield label, tensor


def _check_tensor_sizes(
    path: Path, tensors: list[tuple[str, TensorProto]], max_bytes: int, max_external_bytes: int
) -> None:
    """Refuse tensors whose declared shape alone implies an absurd allocation."""
    for where, tensor in tensors:
        dims = list(tensor.dims)
        if any(not 0 <= d <= MAX_DIM for d in dims):
            raise _refuse(
                path, f"{where} declares shape {dims}; dimensions must lie in 0..{MAX_DIM}"
            )
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise _refuse(path, f"{where} has unknown data type {tensor.data_type}") from None
        declared = math.prod(dims) * itemsize
        limit = max_external_bytes if uses_external_data(tensor) else max_bytes
        if declared > limit:
            raise _refuse(
                path,
                f"{where} declares {declared:,} bytes (shape {dims}), over the "
                f"{limit:,}-byte limit",
            )


# --------------------------------------------------------------------------- external data


def _check_location_text(path: Path, where: str, location: str) -> None:
    """Refuse external-data locations that are empty, absolute or climb out with ``..``."""
    shown = _quote(location)
    if not location:
        raise _refuse(path, f"{where} is stored externally but names no file")
    if "\x00" in location:
        raise _refuse(path, f"{where} has external data location {shown} containing a NUL byte")
    posix = PurePosixPath(location.replace("\\", "/"))
    if posix.is_absolute() or os.path.isabs(location) or (len(location) > 1 and location[1] == ":"):
        raise _refuse(
            path,
            f"{where} has external data at absolute path {shown}; only files next to the "
            "model are read",
        )
    if ".." in posix.parts:
        raise _refuse(path, f"{where} has external data location {shown} containing '..'; refused")


def _external_file_size(path: Path, where: str, location: str) -> int:
    """Size of the external file, after checking where it resolves without opening it.

    ``Path.resolve`` and ``lstat`` only read directory entries and link targets, never file
    contents, so nothing outside the model's folder is opened even when a link points there.
    """
    folder = path.absolute().parent
    candidate = folder / location
    shown = _quote(location)
    try:
        inside = candidate.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise _refuse(
            path, f"{where} has unresolvable external data {shown}: {_detail(exc)}"
        ) from exc
    if not inside:
        raise _refuse(
            path, f"{where} has external data {shown} that resolves outside the model's folder"
        )
    try:
        info = candidate.lstat()
    except FileNotFoundError:
        raise _refuse(path, f"{where} has external data {shown}, which does not exist") from None
    except OSError as exc:
        raise _refuse(
            path, f"{where} has unreadable external data {shown}: {_detail(exc)}"
        ) from exc
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, f"{where} has external data {shown} that is a symlink; refused")
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, f"{where} has external data {shown} that is not a regular file")
    if info.st_nlink > 1:
        raise _refuse(
            path,
            f"{where} has external data {shown} with {info.st_nlink} hard links; a hard link can "
            "expose any file on the disk, so only single-link files are read",
        )
    return info.st_size


def _check_external_references(
    path: Path, tensors: list[tuple[str, TensorProto]], max_external_bytes: int
) -> None:
    """Vet every external-data reference before any external file is opened."""
    total = 0
    for where, tensor in tensors:
        if not uses_external_data(tensor):
            continue
        unknown = sorted({e.key for e in tensor.external_data} - EXTERNAL_DATA_KEYS)
        if unknown:
            raise _refuse(path, f"{where} has unknown external data key {_quote(unknown[0])}")
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as exc:
            raise _refuse(
                path, f"{where} has a malformed external data entry: {_detail(exc)}"
            ) from exc
        _check_location_text(path, where, info.location)
        size = _external_file_size(path, where, info.location)
        offset = info.offset or 0
        length = size - offset if info.length is None else info.length
        if offset + length > size or length < 0:
            raise _refuse(
                path,
                f"{where} declares external bytes {offset:,}..{offset + max(length, 0):,} of "
                f"{_quote(info.location)}, but that file holds {size:,} bytes",
            )
        total += length
        if total > max_external_bytes:
            raise _refuse(
                path,
                f"external data adds up to more than the {max_external_bytes:,}-byte limit "
                f"(at {where})",
            )


def _load_external_data(path: Path, model: onnx.ModelProto) -> None:
    """Read the vetted in-folder external data into the model, then bound the whole model."""
    if any(uses_external_data(t) for _, t in _tensors(model.graph)):
        try:
            load_external_data_for_model(model, str(path.absolute().parent))
        except (onnx.checker.ValidationError, ValueError, OSError) as exc:
            raise _refuse(path, f"cannot load its external data: {_detail(exc)}") from exc
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise _refuse(
            path, f"with its external data exceeds protobuf's {PROTOBUF_LIMIT:,}-byte limit"
        )


# --------------------------------------------------------------------------- after loading


def _run_checker(path: Path, model: onnx.ModelProto) -> onnx.GraphProto:
    """onnx's checker, then strict shape inference: bad nodes, unknown ops, missing inputs.

    This is ``check_model(full_check=True)`` with data propagation switched on, so shapes
    computed from constants (``Shape`` → ``Gather`` → ``ConstantOfShape``) are known too. The
    returned graph carries the inferred ``value_info`` of every intermediate tensor.
    """
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        # ValueError: e.g. an unknown data type in a declared type.
        raise _refuse(path, f"fails the ONNX checker: {_detail(exc)}") from exc
    return inferred.graph


def _check_inferred_shapes(path: Path, graph: onnx.GraphProto) -> None:
    """Refuse intermediate tensors whose inferred shape implies an absurd allocation."""
    for value in (*graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        known = [d.dim_value for d in dims if d.HasField("dim_value")]
        if any(not 0 <= d <= MAX_DIM for d in known) or math.prod(known) > MAX_TENSOR_ELEMENTS:
            raise _refuse(
                path,
                f"tensor {_quote(value.name)} would have shape {_shape_text(dims)}; at most "
                f"{MAX_TENSOR_ELEMENTS:,} elements and dimensions up to {MAX_DIM} are accepted",
            )


def _check_finite(path: Path, tensors: list[tuple[str, TensorProto]]) -> None:
    """NaN/Inf weights make every logit NaN, which metrics would read as wrong predictions."""
    for where, tensor in tensors:
        if tensor.data_type not in FLOAT_TYPES:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except ValueError as exc:  # e.g. raw_data longer than the declared shape
            raise _refuse(path, f"{where} cannot be decoded: {_detail(exc)}") from exc
        if values.dtype.kind != "f":  # bfloat16 comes back as an ml_dtypes type
            values = values.astype(np.float32)
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise _refuse(
                path,
                f"{where} holds {bad:,} non-finite value(s) (NaN/Inf); such weights make "
                "every output meaningless",
            )
