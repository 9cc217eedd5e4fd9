"""A thread count set for one block of work and restored after it, whatever the block does.

torch's intra-op thread count is process-wide state. Neural Cleanse's small per-label batches,
the deployment-diff refinement, a sweep worker and the seeded training loop each want their own
count for a while, and a caller that finds its setting changed behind its back runs slower (or,
for float reductions, sums in another order). :func:`scoped_threads` is the one place that sets
and restores it.

Core module, so it cannot import torch: the caller passes the object that owns the setting
(``torch`` itself, or anything with ``get_num_threads`` / ``set_num_threads``).
"""

from __future__ import annotations

from collections.abc import Iterator
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
