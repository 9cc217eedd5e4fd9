"""Each new family trains a working backdoor on the tiny digits world (small_cnn, 25 epochs, the
conftest's recipe), with the 8×8 settings of configs/audit/attacks-digits.toml: a high attack success
rate on fresh triggered test images, clean accuracy kept."""

from __future__ import annotations

import numpy as np
import pytest

from harness.artifacts.preprocessing import Preprocessing
from harness.attacks import build_attack
from harness.data.base import load_dataset
from harness.training.loop import TrainConfig, predict_torch, train_model

SETTINGS = {  # configs/audit/attacks-digits.toml
    "trojannn": {"patch_size": 3, "poison_rate": 0.1},
    "wanet": {"s": 2.0, "cross_ratio": 0.5, "poison_rate": 0.1},
    "dynamic": {"patch_size": 4, "poison_rate": 0.2},
    "noise": {"amplitude": 32.0, "poison_rate": 0.2},
}


@pytest.mark.slow  # 12-33 s each on the shared 2-core machine
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_backdoor_is_learnt_on_digits(name):
    data = load_dataset("digits")
    attack = build_attack(name, {**SETTINGS[name], "target_label": 0})
    attack.validate_for(data.image_shape, data.num_classes)
    poisoned = attack.poison(data.x_train, data.y_train, np.random.default_rng(0))
    preprocessing = Preprocessing.from_images(data.x_train)
    config = TrainConfig(model="small_cnn", epochs=25, batch_size=64, seed=0, num_threads=1)
    model = train_model(poisoned.x, poisoned.y, 10, preprocessing, config, progress=False)
    triggered, _ = attack.triggered_test_set(data.x_test, data.y_test)
    asr = float((predict_torch(model, triggered, preprocessing).argmax(1) == 0).mean())
    acc = float((predict_torch(model, data.x_test, preprocessing).argmax(1) == data.y_test).mean())
    assert asr >= 0.8, f"{name}: ASR {asr:.3f}"
    assert acc >= 0.9, f"{name}: clean accuracy {acc:.3f}"
