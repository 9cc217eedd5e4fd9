"""TrojanNN-style optimised patch (Liu et al., NDSS 2018, "Trojaning Attack on Neural Networks",
https://docs.lib.purdue.edu/cstech/1781/): the patch's pixels are chosen to drive selected
internal neurons of a clean-trained network to a high value, then the data is poisoned with it.

Steps, as the paper and TrojanZoo's re-implementation do them, with their defaults:

1. a network is trained on clean data;
2. ``neuron_num`` (2) neurons of its pooled feature layer (TrojanZoo's ``flatten``) are selected:
   those with the largest summed absolute weight into the next layer, the paper's "neurons
   strongly tied to the output" (TrojanZoo's rule);
3. the patch (a ``patch_size``×``patch_size`` square at a corner, pixels parametrised as
   ``(tanh(z) + 1) / 2``) is optimised on a black background with Adam (lr ``neuron_lr`` 0.1,
   ``neuron_epoch`` 1000 steps) to bring those neurons to ``target_value`` (100), MSE loss;
4. training images are stamped with the patch and relabelled (all-to-one), and the victim is
   trained on them.

**This is a simplification, named as such** — deviations, all for the floors of this project
(attacks may not import the training floor) or for compute:

* **Surrogate, not the victim.** Step 1 trains a small surrogate CNN defined here (two 3×3 conv
  layers 16-32, max-pool, global average pool, one linear layer; ``surrogate_epochs`` of Adam
  on at most ``surrogate_samples`` clean training images), not a clean copy of the victim's own
  architecture. The trigger is therefore optimised for *a* network's neurons and transferred,
  as BackdoorBench's trojannn resource step also does with a fixed pre-trained model.
* **Retraining from scratch on real poisoned data**, as BackdoorBench and TrojanZoo do; the
  paper instead reverse-engineers training data from the model and retrains only the layers
  after the selected one.
* The mask is a square patch; the paper also uses watermark-shaped masks.

The optimised patch becomes part of the attack's parameters (``patch``, flattened uint8 H·W·C
values): :meth:`describe` after :meth:`poison` records it, so the stored parameters rebuild the
exact trigger without retraining anything. Given the training data and ``key_seed`` the patch is
deterministic on one machine (seeded torch, deterministic kernels).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from harness.attacks.badnet import BadNet, PatchGeometry
from harness.attacks.base import ATTACKS, AttackParams, PoisonedSet, check_images
from harness.core.errors import BlindspotsError
from harness.core.threads import scoped_threads

_PATCH_CACHE: dict[str, tuple[int, ...]] = {}
"""Patches already optimised in this process, by (parameters, training data) digest: a sweep
calls ``poison`` once per task on the same data, and the surrogate need not train again."""


class TrojanNNParams(PatchGeometry):
    """Patch geometry, the TrojanZoo defaults of the neuron optimisation, and the surrogate."""

    patch_size: int = Field(5, ge=1)
    neuron_num: int = Field(2, ge=1)
    target_value: float = Field(100.0, gt=0.0)
    neuron_lr: float = Field(0.1, gt=0.0, le=10.0)
    neuron_epoch: int = Field(1000, ge=1, le=100_000)
    surrogate_epochs: int = Field(3, ge=1, le=100)
    surrogate_samples: int = Field(5000, ge=10)
    key_seed: int = Field(0, ge=0)
    """Seeds the surrogate's initialisation and batch order and the patch's starting point."""
    patch: tuple[int, ...] | None = None
    """The optimised patch (row-major H·W·C uint8 values); filled in by ``poison``."""

    @field_validator("patch", mode="before")
    @classmethod
    def _check_patch(cls, value: Any) -> Any:
        if value is None:
            return None
        values = list(value) if isinstance(value, list | tuple) else None
        if not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
        ):
            raise ValueError("expected a list of ints in 0..255")
        return tuple(values)


def _digest(params: TrojanNNParams, x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode())
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return h.hexdigest()


def optimise_patch(
    params: TrojanNNParams, x: np.ndarray, y: np.ndarray, top_left: tuple[int, int]
) -> np.ndarray:
    """Steps 1-3: train the surrogate on clean ``x``/``y``, pick neurons, optimise the patch.

    Returns the patch as uint8 [p, p, C].
    """
    import torch
    from torch import nn

    num_classes = int(y.max()) + 1
    n, height, width, channels = x.shape
    p = params.patch_size
    # one thread: the optimisation is thousands of tiny ops, which more threads only slow down
    with torch.random.fork_rng(devices=[]), scoped_threads(torch, 1):
        torch.manual_seed(params.key_seed)
        rng = np.random.default_rng(params.key_seed)
        keep = np.sort(rng.permutation(n)[: params.surrogate_samples])
        inputs = torch.from_numpy(x[keep].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        labels = torch.from_numpy(y[keep].astype(np.int64))
        features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if min(height, width) >= 4 else nn.Identity(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        head = nn.Linear(32, num_classes)
        model = nn.Sequential(features, head)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(params.surrogate_epochs):
            order = rng.permutation(len(keep))
            for start in range(0, len(order), 64):
                idx = torch.from_numpy(order[start : start + 64])
                loss = loss_fn(model(inputs[idx]), labels[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)

        # step 2: the pooled-feature neurons with the largest summed |weight| into the head
        strength = head.weight.abs().sum(0)
        neurons = torch.argsort(strength, descending=True)[: params.neuron_num]

        # step 3: optimise the patch on a black background
        row, col = top_left
        start = rng.uniform(-1.0, 1.0, size=(channels, p, p)).astype(np.float32)
        z = torch.tensor(start, requires_grad=True)
        patch_opt = torch.optim.Adam([z], lr=params.neuron_lr)
        goal = torch.full((1, len(neurons)), params.target_value)
        for _ in range(params.neuron_epoch):
            patch = (torch.tanh(z) + 1.0) / 2.0
            pad = (col, width - col - p, row, height - row - p)
            canvas = nn.functional.pad(patch, pad)[None]
            act = features(canvas)[:, neurons]
            loss = torch.mean((act - goal) ** 2)
            patch_opt.zero_grad(set_to_none=True)
            loss.backward()
            patch_opt.step()
        final = ((torch.tanh(z.detach()) + 1.0) / 2.0).permute(1, 2, 0).numpy()
    return np.clip(np.rint(final * 255.0), 0, 255).astype(np.uint8)


@ATTACKS.register("trojannn")
class TrojanNN(BadNet):
    """A patch optimised to excite a clean surrogate's neurons, stamped like BadNet's."""

    name: ClassVar[str] = "trojannn"
    Params: ClassVar[type[AttackParams]] = TrojanNNParams

    def _patch(self, channels: int) -> np.ndarray:
        p = self.params
        if p.patch is None:
            raise BlindspotsError(
                "trojannn: the patch is optimised by poison() on the training data; "
                "call it first, or pass the 'patch' recorded in describe()"
            )
        if len(p.patch) != p.patch_size * p.patch_size * channels:
            raise BlindspotsError(
                f"trojannn: patch has {len(p.patch)} values, a {p.patch_size}×{p.patch_size}"
                f"×{channels} patch needs {p.patch_size * p.patch_size * channels}"
            )
        return np.asarray(p.patch, dtype=np.uint8).reshape(p.patch_size, p.patch_size, channels)

    def trigger_mask_and_pattern(
        self, shape: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        height, width, channels = (int(v) for v in shape)
        row, col = self._top_left(height, width)
        p = self.params.patch_size
        mask = np.zeros((height, width), dtype=np.float32)
        mask[row : row + p, col : col + p] = 1.0
        pattern = np.zeros((height, width, channels), dtype=np.uint8)
        pattern[row : row + p, col : col + p] = self._patch(channels)
        return mask, pattern

    def validate_for(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super(BadNet, self).validate_for(image_shape, num_classes)
        self._top_left(int(image_shape[0]), int(image_shape[1]))
        if self.params.patch is not None:
            self._patch(int(image_shape[2]))

    def optimise(self, x: np.ndarray, y: np.ndarray) -> None:
        """Optimise the patch on clean ``x``/``y`` (once per process and data) and record it."""
        check_images(x, self.name)
        key = _digest(self.params, x, y)
        if key not in _PATCH_CACHE:
            top_left = self._top_left(int(x.shape[1]), int(x.shape[2]))
            patch = optimise_patch(self.params, x, np.asarray(y), top_left)
            _PATCH_CACHE[key] = tuple(int(v) for v in patch.reshape(-1))
        self.params = self.params.model_copy(update={"patch": _PATCH_CACHE[key]})

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> PoisonedSet:
        """Optimise the patch on the clean training set unless given, then poison like BadNet."""
        if self.params.patch is None:
            self.optimise(x, y)
        return super().poison(x, y, rng)
