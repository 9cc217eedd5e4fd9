"""What each new family's trigger is: WaNet's warp is the paper's bicubic field and grid_sample,
with noise-mode cross samples; additive noise stays within its amplitude and reuses Blended's key;
the dynamic trigger is a fresh random patch per image; TrojanNN's patch comes from its
optimisation and travels in its parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.attacks import build_attack
from harness.attacks.trojannn import _PATCH_CACHE
from harness.attacks.wanet import _bicubic_matrix, bilinear_sample
from harness.core.errors import BlindspotsError


def _gray(n: int, h: int = 8, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 200, size=(n, h, h, c), dtype=np.uint8)


def test_wanet_field_and_sampling_match_pytorch():
    coarse = torch.rand(1, 2, 4, 4) * 2 - 1
    expected = F.interpolate(coarse, size=32, mode="bicubic", align_corners=True)[0].numpy()
    m = _bicubic_matrix(4, 32)
    ours = np.stack([m @ coarse[0, c].numpy() @ m.T for c in range(2)])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    images = np.random.default_rng(0).random((2, 16, 16, 3))
    grid = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 2))
    torch_out = F.grid_sample(
        torch.tensor(images).permute(0, 3, 1, 2), torch.tensor(grid), align_corners=True
    )
    np.testing.assert_allclose(
        bilinear_sample(images, grid), torch_out.permute(0, 2, 3, 1).numpy(), atol=1e-12
    )


def test_wanet_warp_is_smooth_and_scales_with_s():
    weak, strong = build_attack("wanet", {"s": 0.01}), build_attack("wanet", {"s": 4.0})
    identity = weak.grid(32, 32)
    assert identity.shape == (1, 32, 32, 2) and np.abs(identity).max() <= 1.0
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (1, 32, 1))[..., None]
    np.testing.assert_array_equal(weak.apply(ramp), ramp)  # a sub-level warp rounds away
    shift = strong.grid(32, 32) - identity
    assert np.abs(shift).max() > 0.05  # pixels really move
    assert np.abs(np.diff(shift, axis=1)).max() < np.abs(shift).max() / 2  # and smoothly


def test_wanet_cross_samples_keep_their_labels_at_the_papers_ratio():
    x, y = _gray(200, c=3), np.arange(200) % 10
    attack = build_attack("wanet", {"poison_rate": 0.1, "cross_ratio": 2.0, "s": 4.0})
    result = attack.poison(x, y, np.random.default_rng(0))
    changed = (result.x != x).any(axis=(1, 2, 3))
    cross = changed & ~result.poison_mask
    assert result.poison_mask.sum() == 20 and cross.sum() == 40
    np.testing.assert_array_equal(result.cross_mask, cross)
    np.testing.assert_array_equal(result.y[cross], y[cross])
    # a cross sample is warped differently from the trigger (the noise), a poisoned one exactly
    idx = np.flatnonzero(cross)
    assert not np.array_equal(result.x[idx], attack.apply(x[idx]))
    np.testing.assert_array_equal(result.x[result.poison_mask], attack.apply(x[result.poison_mask]))


def test_wanet_rejects_a_grid_finer_than_the_image():
    with pytest.raises(BlindspotsError, match="finer than a 8×8"):
        build_attack("wanet", {"k": 9}).validate_for((8, 8, 1), 10)


def test_noise_is_additive_bounded_and_reuses_blendeds_key():
    noise = build_attack("noise", {"amplitude": 8.0, "key_seed": 4})
    blended = build_attack("blended", {"key_seed": 4})
    images = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    out = noise.apply(images).astype(int)
    key = blended.key((8, 8, 3)).astype(np.float64)
    np.testing.assert_array_equal(out[0], np.rint(128 + 8.0 * (2 * key / 255 - 1)))
    assert np.abs(out - 128).max() <= 8 and out.std() > 2
    test = build_attack("noise", {"amplitude": 8.0, "test_amplitude": 32.0}).apply_for_test(images)
    assert np.abs(test.astype(int) - 128).max() > 8


def test_dynamic_trigger_is_one_random_patch_per_image_fresh_at_test_time():
    attack = build_attack("dynamic", {"patch_size": 3})
    images = np.full((50, 8, 8, 3), 128, dtype=np.uint8)
    stamped = attack.apply(images)
    boxes = []
    for img in stamped:
        rows, cols = np.nonzero((img != 128).any(axis=2))
        assert rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3
        boxes.append((rows.min(), cols.min()))
    assert len(set(boxes)) > 5, "places should vary"
    assert len({stamped[i].tobytes() for i in range(50)}) == 50, "patterns should vary"
    assert not np.array_equal(attack.apply_for_test(images), stamped)
    corners = build_attack("dynamic", {"patch_size": 3, "locations": "corners", "margin": 0})
    assert corners.places(8, 8) == [(5, 5), (0, 0), (0, 5), (5, 0)]
    with pytest.raises(BlindspotsError, match="does not fit"):
        build_attack("dynamic", {"patch_size": 9}).validate_for((8, 8, 1), 10)


def test_trojannn_patch_is_optimised_once_and_recorded():
    x, y = _gray(300, c=1), np.arange(300) % 10
    params = {"patch_size": 3, "neuron_epoch": 30, "surrogate_epochs": 1}
    attack = build_attack("trojannn", params)
    with pytest.raises(BlindspotsError, match="optimised by poison"):
        attack.apply(x[:2])
    _PATCH_CACHE.clear()
    result = attack.poison(x, y, np.random.default_rng(0))
    patch = attack.describe()["params"]["patch"]
    assert len(patch) == 9 and all(0 <= v <= 255 for v in patch)
    idx = result.poison_indices
    np.testing.assert_array_equal(
        result.x[idx][:, 4:7, 4:7, 0], np.broadcast_to(np.reshape(patch, (3, 3)), (len(idx), 3, 3))
    )
    _PATCH_CACHE.clear()  # recomputed from scratch: the same patch on this machine
    again = build_attack("trojannn", params)
    again.poison(x, y, np.random.default_rng(0))
    assert again.describe()["params"]["patch"] == patch
    mask, pattern = again.trigger_mask_and_pattern((8, 8, 1))
    assert mask.sum() == 9 and math.isclose(float(pattern[4:7, 4:7, 0].sum()), sum(patch))
    with pytest.raises(BlindspotsError, match="patch has 9 values"):
        build_attack("trojannn", {"patch_size": 3, "patch": patch}).apply(_gray(1, c=3))
