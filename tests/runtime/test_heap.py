"""Neural Cleanse's retained heap: freed tensor memory is reused without page faults, and nested
blocks share one setting (harness.core.threads.retained_heap)."""

from __future__ import annotations

import resource
import statistics
import sys

import pytest
import torch

from harness.core import threads
from harness.core.threads import _glibc, retained_heap

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _glibc() is None, reason="glibc's mallopt only"
)


def _faults_per_cycle(cycles: int = 30) -> float:
    """Median minor page faults of an allocate-touch-free cycle of a 4 MiB tensor (1024 pages)."""
    counts = []
    for _ in range(cycles):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(1 << 20)  # 4 MiB, written, freed
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(statistics.median(counts))


def test_retained_heap_reuses_freed_pages_and_restores():
    with retained_heap() as active:
        assert active
        with retained_heap():  # nested: shares the setting
            _faults_per_cycle(10)  # the heap grows to its working size first
            inside = _faults_per_cycle()
        still = _faults_per_cycle()
    assert inside < 100 and still < 100, (inside, still)
    # the outermost block has ended (its thresholds cannot be read back from glibc)
    assert threads._heap_depth == 0
