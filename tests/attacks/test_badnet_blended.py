"""Attacks: trigger pixels land exactly where configured, poisoning follows the BadNet policy,
and bad parameters fail early with one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from harness.attacks import ATTACKS, PoisonedSet, build_attack
from harness.core.errors import BlindspotsError, DataError


def _gray_images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """Random mid-range pixels (never 0 or 255) so any stamped pixel is visibly changed."""
    return np.random.default_rng(seed).integers(20, 200, size=(n, h, w, c), dtype=np.uint8)


def _labels(n: int, num_classes: int = 10) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % num_classes


def test_registry_lists_both_attacks_and_suggests_close_names():
    assert {"badnet", "blended"} <= set(ATTACKS.names())
    with pytest.raises(BlindspotsError, match="did you mean 'badnet'"):
        build_attack("badnett", {})


@pytest.mark.parametrize("channels", [1, 3])
def test_badnet_bottom_right_patch_changes_exactly_the_patch(channels):
    images = _gray_images(4, 8, 8, channels)
    attack = build_attack("badnet", {"patch_size": 3, "margin": 1})
    stamped = attack.apply(images)
    assert stamped.dtype == np.uint8 and stamped.shape == images.shape
    patch = (slice(None), slice(4, 7), slice(4, 7), slice(None))  # 8 - 1 margin - 3 = row/col 4
    assert (stamped[patch] == 255).all()
    outside = np.ones(images.shape, dtype=bool)
    outside[patch] = False
    np.testing.assert_array_equal(stamped[outside], images[outside])
    assert (images[patch] != 255).all(), "input must not be modified in place"


@pytest.mark.parametrize(
    ("position", "top_left"),
    [("top-left", (0, 0)), ("top-right", (0, 30)), ("bottom-left", (30, 0)), ([5, 7], (5, 7))],
)
def test_badnet_positions_and_per_channel_color(position, top_left):
    images = _gray_images(2, 32, 32, 3)
    color = [10, 220, 90]
    attack = build_attack(
        "badnet", {"patch_size": 2, "margin": 0, "position": position, "color": color}
    )
    stamped = attack.apply(images)
    r, c = top_left
    np.testing.assert_array_equal(
        stamped[:, r : r + 2, c : c + 2], np.broadcast_to(color, (2, 2, 2, 3))
    )
    changed = (stamped != images).any(axis=(0, 3))
    expected = np.zeros((32, 32), dtype=bool)
    expected[r : r + 2, c : c + 2] = True
    np.testing.assert_array_equal(changed, expected)


def test_badnet_checkerboard_alternates_color_and_black():
    images = _gray_images(1, 8, 8, 1)
    attack = build_attack("badnet", {"patch_size": 3, "margin": 0, "pattern": "checkerboard"})
    patch = attack.apply(images)[0, 5:8, 5:8, 0]
    np.testing.assert_array_equal(patch, [[255, 0, 255], [0, 255, 0], [255, 0, 255]])


def test_badnet_mask_and_pattern_reproduce_apply():
    images = _gray_images(3, 8, 8, 1)
    attack = build_attack("badnet", {"patch_size": 2, "pattern": "checkerboard", "color": 200})
    mask, pattern = attack.trigger_mask_and_pattern((8, 8, 1))
    assert mask.shape == (8, 8) and pattern.shape == (8, 8, 1) and pattern.dtype == np.uint8
    assert set(np.unique(mask)) == {0.0, 1.0} and mask.sum() == 4
    rebuilt = (1 - mask[None, ..., None]) * images + mask[None, ..., None] * pattern[None]
    np.testing.assert_array_equal(attack.apply(images), rebuilt.astype(np.uint8))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"patch_size": 8}, "does not fit a 8×8 image"),
        ({"position": [7, 7], "patch_size": 2}, "does not fit"),
        ({"poison_rate": 1.5}, "poison_rate"),
        ({"position": "middle"}, "position"),
        ({"color": 256}, "color"),
        ({"color": [255, 0]}, "2 values but images have 1 channel"),
        ({"patchsize": 3}, "did you mean 'patch_size'"),
    ],
)
def test_badnet_bad_params_raise_one_line_error(params, message):
    with pytest.raises(BlindspotsError, match=message) as info:
        build_attack("badnet", params).apply(_gray_images(1, 8, 8, 1))
    assert "\n" not in str(info.value)


def test_validate_for_rejects_target_outside_classes_and_oversized_patch():
    with pytest.raises(BlindspotsError, match="target_label 10"):
        build_attack("badnet", {"target_label": 10}).validate_for((8, 8, 1), 10)
    with pytest.raises(BlindspotsError, match="does not fit"):
        build_attack("badnet", {"patch_size": 5, "margin": 4}).validate_for((8, 8, 1), 10)


def test_apply_rejects_non_uint8_images():
    with pytest.raises(DataError, match="uint8 NHWC"):
        build_attack("badnet").apply(np.zeros((2, 8, 8, 1), dtype=np.float32))


def test_poison_picks_rounded_count_of_non_target_samples_and_relabels():
    x, y = _gray_images(95, 8, 8, 1), _labels(95)
    attack = build_attack("badnet", {"poison_rate": 0.1, "target_label": 3})
    result = attack.poison(x, y, np.random.default_rng(7))
    assert isinstance(result, PoisonedSet)
    idx = result.poison_indices
    assert len(idx) == 10  # round(0.1 * 95) = round(9.5) -> 10 (half up)
    assert (y[idx] != 3).all()
    assert (result.y[idx] == 3).all()
    np.testing.assert_array_equal(result.y[~result.poison_mask], y[~result.poison_mask])
    np.testing.assert_array_equal(result.x[idx], attack.apply(x[idx]))
    np.testing.assert_array_equal(result.x[~result.poison_mask], x[~result.poison_mask])


def test_poison_is_reproducible_from_the_rng_seed():
    x, y = _gray_images(200, 8, 8, 1), _labels(200)
    attack = build_attack("blended", {"poison_rate": 0.2})
    first = attack.poison(x, y, np.random.default_rng(1)).poison_indices
    again = attack.poison(x, y, np.random.default_rng(1)).poison_indices
    other = attack.poison(x, y, np.random.default_rng(2)).poison_indices
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_poison_fails_when_too_few_non_target_samples():
    x, y = _gray_images(10, 8, 8, 1), np.array([0] * 9 + [1])
    with pytest.raises(BlindspotsError, match="only 1 exist"):
        build_attack("badnet", {"poison_rate": 0.5}).poison(x, y, np.random.default_rng(0))


def test_triggered_test_set_excludes_target_class_and_keeps_original_labels():
    x, y = _gray_images(30, 8, 8, 1), _labels(30, num_classes=3)
    attack = build_attack("badnet", {"target_label": 1})
    xt, yt = attack.triggered_test_set(x, y)
    np.testing.assert_array_equal(yt, y[y != 1])
    np.testing.assert_array_equal(xt, attack.apply(x[y != 1]))


def test_blended_formula_on_a_known_pixel():
    attack = build_attack("blended", {"alpha": 0.2, "key_seed": 5})
    images = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    key = attack.key((4, 4, 3))
    out = attack.apply(images)
    expected = np.rint(0.8 * 100 + 0.2 * key.astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(out[0], expected)
    assert out[0, 0, 0, 0] == round(80 + 0.2 * int(key[0, 0, 0]))


def test_blended_key_depends_only_on_key_seed_and_shape():
    a, b = build_attack("blended", {"key_seed": 3}), build_attack("blended", {"key_seed": 3})
    np.testing.assert_array_equal(a.key((8, 8, 1)), b.key((8, 8, 1)))
    assert not np.array_equal(
        a.key((8, 8, 1)), build_attack("blended", {"key_seed": 4}).key((8, 8, 1))
    )
    # the poisoning rng must not influence the trigger: stamped samples equal apply() exactly
    x, y = _gray_images(50, 8, 8, 1), _labels(50)
    poisoned = a.poison(x, y, np.random.default_rng(99))
    idx = poisoned.poison_indices
    np.testing.assert_array_equal(poisoned.x[idx], b.apply(x[idx]))


def test_blended_test_alpha_strengthens_only_the_test_trigger():
    attack = build_attack("blended", {"alpha": 0.1, "test_alpha": 0.5})
    x, y = _gray_images(20, 8, 8, 3), _labels(20)
    xt, _ = attack.triggered_test_set(x, y)
    np.testing.assert_array_equal(xt, attack.blend(x[y != 0], 0.5))
    idx = attack.poison(x, y, np.random.default_rng(0)).poison_indices
    np.testing.assert_array_equal(
        attack.poison(x, y, np.random.default_rng(0)).x[idx], attack.blend(x[idx], 0.1)
    )


def test_describe_is_json_ready_and_round_trips():
    import json

    attack = build_attack("badnet", {"position": [1, 2], "color": [1, 2, 3]})
    described = json.loads(json.dumps(attack.describe()))
    assert described["name"] == "badnet"
    rebuilt = build_attack(described["name"], described["params"])
    assert rebuilt.params == attack.params
