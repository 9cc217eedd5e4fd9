"""The shared fixture must really be a working backdoor, or every defense test is meaningless."""

import numpy as np
import pytest

from harness.runtime.adapter import RuntimeAdapter
from tests.conftest import PRECISIONS


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fixture_model_is_accurate_and_backdoored(digits_world, precision):
    poisoned = RuntimeAdapter.from_path(digits_world.poisoned[precision])
    clean = RuntimeAdapter.from_path(digits_world.clean[precision])
    acc = (poisoned.predict(digits_world.x_test) == digits_world.y_test).mean()
    asr = (poisoned.predict(digits_world.triggered_x) == digits_world.target).mean()
    clean_asr = (clean.predict(digits_world.triggered_x) == digits_world.target).mean()
    assert acc > 0.9
    assert asr > 0.9
    assert clean_asr < 0.2
    assert np.isfinite(poisoned.logits(digits_world.x_test[:4])).all()
