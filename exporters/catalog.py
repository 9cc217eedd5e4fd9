"""Deployment precisions by name, without onnxruntime: a lazy table whose entries import
:mod:`exporters.precisions` on first use, so listing or validating names stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.core.registry import Registry

if TYPE_CHECKING:
    from exporters.precisions import Quantizer

PRECISIONS: Registry[type[Quantizer]] = Registry("precision")
for _name in ("fp32", "int8-dynamic", "int8-static", "int4"):
    PRECISIONS.register_lazy(_name, "exporters.precisions")
