"""Model architectures by name, without torch: a lazy table whose entries import
:mod:`harness.training.models` (and torch) on first use, so listing them stays cheap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness.core.registry import Registry

MODELS: Registry[Callable[[int, int], Any]] = Registry("model")
for _name in ("small_cnn", "cifar_cnn", "resnet18"):
    MODELS.register_lazy(_name, "harness.training.models")
