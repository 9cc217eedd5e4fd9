"""Seeded sampling shared by the runner and the audit: named seeds and stratified samples."""

from __future__ import annotations

import zlib

import numpy as np


def stable_seed(*parts: object) -> np.random.SeedSequence:
    """Seed sequence from names and numbers, identical across processes (no ``hash()``)."""
    return np.random.SeedSequence([zlib.crc32(str(p).encode()) for p in parts])


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of about ``size`` items with every class in proportion to ``labels``.

    Defenses judge a model on the auditor's data; taking the first images of a folder dataset
    (sorted by class) would hand them one class only. Each class gets
    ``round(size · share)`` items (at least one), drawn without replacement.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.maximum(1, np.round(size * counts / len(labels)).astype(int))
    chosen = [
        rng.choice(np.flatnonzero(labels == label), min(quota, count), replace=False)
        for label, quota, count in zip(classes, quotas, counts, strict=True)
    ]
    return np.sort(np.concatenate(chosen))
