"""Every registered attack keeps the contract the runner relies on: its trigger is a pure
function of its parameters, it poisons exactly the configured fraction (target-class images never
chosen), and stamped images stay uint8 of the same shape."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.attacks import ATTACKS, build_attack

# Small-image settings: TrojanNN's surrogate and patch optimisation cut to a few steps.
PARAMS: dict[str, dict] = {
    "badnet": {"patch_size": 2},
    "blended": {},
    "dynamic": {"patch_size": 3},
    "noise": {"amplitude": 16.0},
    "trojannn": {"patch_size": 3, "neuron_epoch": 20, "surrogate_epochs": 1},
    "wanet": {"s": 2.0},
}
NAMES = sorted(ATTACKS.names())


def _data(n: int = 120, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(20, 200, size=(n, 8, 8, channels), dtype=np.uint8)
    return x, np.arange(n, dtype=np.int64) % 10


def _build(name: str, **extra) -> object:
    return build_attack(name, {**PARAMS[name], **extra})


def test_every_registered_attack_has_small_image_settings_here():
    assert set(NAMES) == set(PARAMS), "add the new attack's small-image parameters to PARAMS"
    assert {"wanet", "trojannn", "dynamic", "noise"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_poisons_exactly_the_configured_fraction_in_range(name, channels):
    x, y = _data(channels=channels)
    attack = _build(name, poison_rate=0.15, target_label=2)
    result = attack.poison(x, y, np.random.default_rng(3))
    count = math.floor(0.15 * len(x) + 0.5)
    idx = result.poison_indices
    assert len(idx) == count and result.poison_mask.dtype == bool
    assert (y[idx] != 2).all() and (result.y[idx] == 2).all()
    np.testing.assert_array_equal(result.y[~result.poison_mask], y[~result.poison_mask])
    assert result.x.dtype == np.uint8 and result.x.shape == x.shape
    assert not np.array_equal(result.x[idx], x[idx]), "the trigger changed nothing"
    changed = (result.x != x).any(axis=(1, 2, 3))
    assert not (changed & ~result.modified_mask).any()
    # only WaNet touches unpoisoned images: its noise-mode cross samples, labels kept
    cross = math.floor(attack.params.cross_ratio * count + 0.5) if name == "wanet" else 0
    assert (result.modified_mask & ~result.poison_mask).sum() == cross
    assert x.min() >= 20, "input modified in place"


@pytest.mark.parametrize("name", NAMES)
def test_poisoning_and_trigger_are_deterministic_given_the_seeds(name):
    x, y = _data(channels=3)
    first = _build(name).poison(x, y, np.random.default_rng(1))
    again = _build(name).poison(x, y, np.random.default_rng(1))
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    other = _build(name).poison(x, y, np.random.default_rng(2))
    assert not np.array_equal(first.poison_indices, other.poison_indices)


@pytest.mark.parametrize("name", ["blended", "dynamic", "noise", "trojannn", "wanet"])
def test_key_seed_alone_changes_the_trigger(name):
    x, y = _data(channels=3)
    stamped = []
    for key_seed in (0, 0, 5):
        attack = _build(name, key_seed=key_seed)
        attack.poison(x, y, np.random.default_rng(0))  # TrojanNN optimises its patch here
        stamped.append(attack.apply_for_test(x[:10]))
    np.testing.assert_array_equal(stamped[0], stamped[1])
    assert not np.array_equal(stamped[0], stamped[2])


@pytest.mark.parametrize("name", NAMES)
def test_described_params_rebuild_the_same_trigger(name):
    x, y = _data(channels=3)
    attack = _build(name)
    poisoned = attack.poison(x, y, np.random.default_rng(0))
    described = json.loads(json.dumps(attack.describe()))
    rebuilt = build_attack(described["name"], described["params"])
    idx = poisoned.poison_indices
    np.testing.assert_array_equal(rebuilt.apply(x[idx]), attack.apply(x[idx]))
    test_x, test_y = rebuilt.triggered_test_set(x, y)
    assert test_x.dtype == np.uint8 and (test_y != attack.target_label).all()
