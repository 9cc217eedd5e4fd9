"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, whole.

A plain ``path.write_text`` or ``torch.save(obj, path)`` truncates the file first and fills it
after; a process killed in between (SIGKILL, power loss, a full disk) leaves a short file that
every later run trips over. Here every write goes to a hidden temporary file in the destination
folder (same filesystem, so the rename cannot be a copy), is flushed to disk with ``fsync``, and
only then replaces the destination with ``os.replace``; the folder is fsynced too, so the rename
itself survives a power loss. On any failure the temporary file is removed and the destination is
untouched.

An ``OSError`` (full disk, permissions, a read-only mount) becomes one ``BlindspotsError`` line
naming the file and the cause: the user can act on it, so it must not look like a bug.

Core module: it imports nothing from the harness but its errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.core.errors import BlindspotsError

PARTIAL_MARK = ".partial"
"""Infix of every temporary file name, so leftovers of a killed writer can be found again."""

_PARTIAL_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.partial(\.[^./]*)?$")


def write_error(path: Path, exc: OSError, action: str = "write") -> BlindspotsError:
    """The one-line error for an OS-level failure on ``path`` (``ENOSPC`` → 'No space left...').

    Where the failing call named another file (a writer reading its input), that file is named
    too, so the message never blames the destination for someone else's missing file.
    """
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc)
    cause = (cause or type(exc).__name__).splitlines()[0]
    named = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, str | bytes) else path
    ours = named == path or (named.parent == path.parent and _PARTIAL_NAME.match(named.name))
    other = None if ours else named
    return BlindspotsError(f"cannot {action} {path}: {cause}" + (f" ({other})" if other else ""))


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be partial on some filesystems)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable; a no-op where directories can't sync."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network / FUSE filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _new_partial(path: Path) -> Path:
    """Create an empty, hidden temporary file beside ``path`` that keeps its suffix.

    The suffix matters: ``np.savez`` appends ``.npz`` to a name without it, and plotting or
    ONNX tools choose a format by extension. ``O_EXCL`` with a random token never reuses a name;
    the mode (0666 less the umask) is what a plain ``open(path, "w")`` would give.
    """
    while True:
        name = f".{path.name}.{secrets.token_hex(4)}{PARTIAL_MARK}{path.suffix}"
        candidate = path.with_name(name)
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``path``.

    For writers that want a path of their own (``torch.save``, ``np.savez``, ``onnx.save``,
    ``fig.savefig``)::

        with atomic_target(folder / "model.pt") as tmp:
            torch.save(state, tmp)

    If the body raises (or the process dies), ``path`` keeps its previous content, if any.
    """
    with atomic_targets(path) as (partial,):
        yield partial


@contextlib.contextmanager
def atomic_targets(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield one temporary path per destination; on success they replace theirs, in order.

    For files that belong together, such as a quantized model and its sidecar::

        with atomic_targets(model_path, sidecar_path) as (model_tmp, sidecar_tmp):
            ...

    Each destination is replaced atomically. If a later one cannot be replaced, the ones
    already replaced are removed again, so no file is left beside a companion that is not its
    own (the first destination is gone rather than paired with an old second one). If the body
    raises, every destination keeps its previous content; a killed process leaves only
    temporary files that :func:`remove_partials` recognises.
    """
    targets = [Path(p) for p in paths]
    partials: list[Path] = []
    current = targets[0]
    try:
        for current in targets:
            current.parent.mkdir(parents=True, exist_ok=True)
            partials.append(_new_partial(current))
        current = targets[0]
        yield tuple(partials)
        for partial in partials:
            _fsync_file(partial)
        replaced: list[Path] = []
        for current, partial in zip(targets, partials, strict=True):
            try:
                os.replace(partial, current)
            except OSError:
                for earlier in replaced:
                    earlier.unlink(missing_ok=True)
                raise
            replaced.append(current)
        for folder in dict.fromkeys(target.parent for target in targets):
            fsync_directory(folder)
    except OSError as exc:
        raise write_error(current, exc) from None
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)  # gone after os.replace; left only by a failure


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_target(path) as partial:
        fd = os.open(partial, os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Replace ``path`` with ``obj`` as JSON (plus a final newline) atomically; returns ``path``.

    The document is serialised before the file is touched, so an object that is not JSON
    raises ``TypeError`` with the old file intact.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def remove_partials(folder: str | Path) -> list[Path]:
    """Delete temporary files that killed writers left anywhere under ``folder``; returns them.

    Only safe while no other process writes into ``folder`` (hold its
    :class:`~harness.core.runlock.RunLock`): a live writer's temporary file looks the same.
    """
    removed = []
    for candidate in Path(folder).rglob(f".*{PARTIAL_MARK}*"):
        if candidate.is_file() and _PARTIAL_NAME.match(candidate.name):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed
