"""What a defense may ask of the deployed model: the one seam between defenses and the runtime.

Defenses never import onnxruntime or the runtime package (``.importlinter``); they receive an
object with this shape — in the harness :class:`harness.runtime.adapter.RuntimeAdapter` over an
onnxruntime session, in tests a small fake. Writing the shape down as a :class:`typing.Protocol`
lets the type checker hold both sides to it (``tests/architecture/test_architecture.py`` checks the adapter
conforms) and tells a plug-in author exactly what they can rely on.

Every capability maps to a :class:`defenses.base.Need`: a defense declares what it uses and
:meth:`defenses.base.Defense.missing_needs` refuses a cell that lacks it before any work.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class QueryCount(Protocol):
    """How many images the deployed session has answered (a defense's query cost)."""

    @property
    def images(self) -> int: ...


class Parity(Protocol):
    """The gradient oracle's agreement with the deployed session on clean images."""

    @property
    def passed(self) -> bool: ...

    def summary(self) -> str: ...


class GradientOracle(Protocol):
    """Gradients through a replica of the deployed arithmetic (``Need.GRADIENTS``)."""

    @property
    def output_quantizer(self) -> Any: ...

    def parity(self, images: np.ndarray, threshold: float = ...) -> Parity: ...

    def logits_with_pre_quantizer(self, pixels: Any) -> Any: ...


class DeployedModel(Protocol):
    """A deployed classifier as defenses see it (pixels are uint8 HWC, as a camera gives them).

    ``logits``/``predict``/``probabilities`` (``Need.LOGITS``); ``layers`` and ``activations``
    (``Need.ACTIVATIONS``); ``last_conv_channels`` and ``with_channels_masked``
    (``Need.CHANNEL_MASK``); ``gradient_oracle`` (``Need.GRADIENTS``); ``input_conv_kernel``,
    ``input_shape`` and ``preprocessing`` describe the input side (the differential check reads
    them off its FP32 reference).
    """

    @property
    def precision(self) -> str: ...

    @property
    def counter(self) -> QueryCount: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def preprocessing(self) -> Any: ...

    @property
    def layers(self) -> list[str]: ...

    @property
    def last_conv_channels(self) -> int: ...

    def logits(self, pixels: np.ndarray) -> np.ndarray: ...

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...

    def probabilities(self, pixels: np.ndarray) -> np.ndarray: ...

    def activations(
        self, pixels: np.ndarray, layers: list[str] | None = None
    ) -> dict[str, np.ndarray]: ...

    def with_channels_masked(self, keep: np.ndarray) -> DeployedModel: ...

    def input_conv_kernel(self) -> np.ndarray | None: ...

    def gradient_oracle(self) -> GradientOracle: ...
