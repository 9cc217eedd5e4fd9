"""Process-wide settings for one block of work, restored after it: torch's thread count, and
the C heap's habit of handing freed memory back to the kernel.

torch's intra-op thread count is process-wide state. Neural Cleanse's small per-label batches,
the deployment-diff refinement, a sweep worker and the seeded training loop each want their own
count for a while, and a caller that finds its setting changed behind its back runs slower (or,
for float reductions, sums in another order). :func:`scoped_threads` is the one place that sets
and restores it.

Core module, so it cannot import torch: the caller passes the object that owns the setting
(``torch`` itself, or anything with ``get_num_threads`` / ``set_num_threads``).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def scoped_threads(owner: Any, threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` threads (the current count for None); restore it after.

    ``with scoped_threads(torch, 1): ...`` — the previous count comes back even when the block
    raises, and even when something inside changed it again. ``owner`` is typed ``Any``: the
    ``torch`` module (what every caller passes) does not satisfy a structural type in torch's
    stubs, and this core module may not name torch.
    """
    previous = owner.get_num_threads()
    if threads is not None:
        owner.set_num_threads(threads)
    try:
        yield
    finally:
        owner.set_num_threads(previous)


# ---------------------------------------------------------------------------------- the C heap
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap, not from a fresh mapping (glibc's largest allowed).
RETAINED_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of a heap kept rather than returned to the kernel.
RETAINED_TRIM_THRESHOLD = 1024 * 1024 * 1024
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc() -> tuple[Callable[[int, int], int], Callable[[int], int]] | None:
    """glibc's ``mallopt`` and ``malloc_trim``, or None (another libc, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None


def retain_heap() -> bool:
    """Keep freed heap memory in the process for its remaining life (False: not glibc).

    For a worker process that runs nothing but small repeated tensor work (Neural Cleanse's
    label tasks); :func:`retained_heap` is the scoped form.
    """
    calls = _glibc()
    if calls is None:
        return False
    mallopt, _ = calls
    return bool(
        mallopt(_M_MMAP_THRESHOLD, RETAINED_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD)
    )


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Run the block with freed memory kept in the process, not returned to the kernel.

    torch on CPU has no caching allocator: every activation of a few MB is a ``malloc``, which
    glibc serves from a fresh ``mmap`` (above its threshold) or from a heap it trims again on
    ``free`` — so each new tensor's pages fault in anew. A Neural Cleanse step on the GTSRB grid's
    ``cifar_cnn`` took ~3,000 such page faults for 16 images, a large share of its CPU time.
    Inside the block blocks below 32 MiB come from the heap and up to 1 GiB of free heap stays
    mapped, so a step reuses the last step's pages. Only *where* memory comes from changes: no
    value computed inside can differ. On exit the trim threshold drops to 64 MiB, twice the mmap
    threshold (the pair glibc's own dynamic rule reaches once a 32 MiB block was freed; setting
    either turns that rule off, so the process's initial state cannot be restored) and the free
    memory is returned (``malloc_trim``). Nested or concurrent blocks share one setting; the
    outermost restores it. Yields False (and changes nothing) off glibc.
    """
    global _heap_depth
    calls = _glibc()
    if calls is None:
        yield False
        return
    mallopt, malloc_trim = calls
    with _heap_lock:
        _heap_depth += 1
        if _heap_depth == 1:
            retain_heap()
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                mallopt(_M_TRIM_THRESHOLD, 2 * RETAINED_MMAP_THRESHOLD)
                malloc_trim(0)
