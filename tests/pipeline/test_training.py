"""Training: a BadNet-poisoned digits model learns both the task and the backdoor; training is
bit-for-bit reproducible from its seed; checkpoints round-trip and fail cleanly when damaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from harness.artifacts.preprocessing import Preprocessing
from harness.attacks import build_attack
from harness.core.errors import BlindspotsError, ModelError
from harness.training.loop import (
    TrainConfig,
    checkpoint_meta,
    load_model,
    load_state,
    predict_torch,
    save_state,
    train_model,
)

# One thread: on a shared 2-core machine a busy neighbour makes 2-thread OpenMP spin for seconds.
CONFIG = TrainConfig(epochs=10, batch_size=64, seed=0, num_threads=1)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8×8 digits as uint8 NHWC (0..16 scaled to 0..255), stratified 70/30 split."""
    raw = load_digits()
    x = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = raw.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def poisoned(digits):
    x_train, _, y_train, _ = digits
    attack = build_attack("badnet", {"patch_size": 3, "poison_rate": 0.1, "target_label": 0})
    data = attack.poison(x_train, y_train, np.random.default_rng(0))
    preprocessing = Preprocessing.from_images(x_train)
    model = train_model(data.x, data.y, 10, preprocessing, CONFIG, progress=False)
    return model, data, preprocessing, attack


def _accuracy(model, x, y, preprocessing) -> float:
    return float((predict_torch(model, x, preprocessing).argmax(1) == y).mean())


def test_poisoned_model_learns_task_and_backdoor(digits, poisoned):
    _, x_test, _, y_test = digits
    model, _, preprocessing, attack = poisoned
    assert not model.training
    assert _accuracy(model, x_test, y_test, preprocessing) >= 0.9
    x_trig, _ = attack.triggered_test_set(x_test, y_test)
    asr = float(
        (predict_torch(model, x_trig, preprocessing).argmax(1) == attack.target_label).mean()
    )
    assert asr >= 0.9


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights_and_other_seed_differs(poisoned):
    model, data, preprocessing, _ = poisoned
    again = train_model(data.x, data.y, 10, preprocessing, CONFIG, progress=False)
    assert _states_equal(model, again)
    short = dict(epochs=1)
    other = train_model(
        data.x,
        data.y,
        10,
        preprocessing,
        CONFIG.model_copy(update={**short, "seed": 1}),
        progress=False,
    )
    same_short = train_model(
        data.x, data.y, 10, preprocessing, CONFIG.model_copy(update=short), progress=False
    )
    assert not _states_equal(other, same_short)


def test_training_restores_global_torch_state(poisoned):
    """Training must not leak its seed, deterministic mode or thread count into the caller."""
    _, data, preprocessing, _ = poisoned
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_model(
        data.x[:64],
        data.y[:64],
        10,
        preprocessing,
        TrainConfig(epochs=1, num_threads=1),
        progress=False,
    )
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads


def test_augmented_training_is_reproducible(poisoned):
    _, data, preprocessing, _ = poisoned
    config = TrainConfig(epochs=1, augment=True, seed=3, num_threads=1)
    a = train_model(data.x[:300], data.y[:300], 10, preprocessing, config, progress=False)
    b = train_model(data.x[:300], data.y[:300], 10, preprocessing, config, progress=False)
    assert _states_equal(a, b)


def test_save_load_round_trip_gives_identical_logits(tmp_path, digits, poisoned):
    _, x_test, _, _ = digits
    model, _, preprocessing, attack = poisoned
    meta = checkpoint_meta(CONFIG, 10, 1, preprocessing, attack=attack.describe())
    path = save_state(model, tmp_path / "nested" / "model.pt", meta)
    loaded, loaded_meta = load_model(path)
    assert loaded_meta["attack"]["name"] == "badnet"
    assert Preprocessing.from_json(loaded_meta["preprocessing"]) == preprocessing
    np.testing.assert_array_equal(
        predict_torch(loaded, x_test, preprocessing), predict_torch(model, x_test, preprocessing)
    )


def test_corrupt_or_missing_checkpoint_raises_model_error(tmp_path, poisoned):
    model, _, preprocessing, _ = poisoned
    with pytest.raises(ModelError, match="not found"):
        load_state(tmp_path / "absent.pt")
    good = save_state(model, tmp_path / "good.pt", checkpoint_meta(CONFIG, 10, 1, preprocessing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelError, match="cannot load model file") as info:
        load_model(corrupt)
    assert "\n" not in str(info.value)
    wrong_arch = save_state(
        model,
        tmp_path / "wrong.pt",
        checkpoint_meta(TrainConfig(model="cifar_cnn"), 10, 1, preprocessing),
    )
    with pytest.raises(ModelError, match="do not match model 'cifar_cnn'"):
        load_model(wrong_arch)


class _Payload:
    """An arbitrary class: unpickling it from a model file would mean running foreign code."""


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    """weights_only loading must refuse arbitrary objects rather than unpickle them."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": {"x": _Payload()}}, path)
    with pytest.raises(ModelError, match="cannot load model file"):
        load_state(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"modle": "small_cnn"}, "did you mean 'model'"),
        ({"model": "small_cn"}, "did you mean 'small_cnn'"),
    ],
)
def test_bad_training_options_raise_one_line_errors(options, message):
    with pytest.raises(BlindspotsError, match=message) as info:
        TrainConfig(**options)
    assert "\n" not in str(info.value)


def test_random_crops_are_shifted_windows_of_the_padded_image():
    """Augmentation must shift images (black border in), never scramble pixels across samples."""
    from harness.training.loop import _random_crops

    padded = torch.arange(6 * 2 * 6 * 6, dtype=torch.float32).reshape(6, 2, 6, 6)
    idx = np.array([5, 0, 3, 3])
    crops = _random_crops(padded, idx, (4, 4), np.random.default_rng(0))
    offsets = set()
    for crop, i in zip(crops, idx, strict=True):
        windows = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(crop, padded[i, :, dy : dy + 4, dx : dx + 4])
        ]
        assert len(windows) == 1
        offsets.add(windows[0])
    assert len(offsets) > 1


def test_passing_a_model_fine_tunes_it_instead_of_starting_fresh(digits, poisoned):
    """Fine-Pruning retrains the pruned network: its learned weights must be the start point."""
    import copy

    x_train, x_test, y_train, y_test = digits
    model, _, preprocessing, _ = poisoned
    start = copy.deepcopy(model)
    config = TrainConfig(epochs=1, lr=1e-3, schedule="cosine", num_threads=1)
    tuned = train_model(x_train, y_train, 10, preprocessing, config, progress=False, model=start)
    assert tuned is start and not tuned.training
    assert not _states_equal(tuned, model)
    # a fresh 1-epoch model is near chance; a fine-tuned trained one keeps its accuracy
    assert _accuracy(tuned, x_test, y_test, preprocessing) >= 0.9
