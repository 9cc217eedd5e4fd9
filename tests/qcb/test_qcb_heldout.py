"""bench.qcb.qcb_heldout scores on the test images after the table's, never on the table's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.qcb.qcb_heldout import held_out_sets
from harness.qcb.pipeline import load_qcb_config, qcb_dataset

CONFIG = Path(__file__).parents[2] / "configs" / "qcb" / "qcb-gtsrb.toml"


def test_held_out_images_are_the_ones_after_eval_limit(rgb_npz):
    config = load_qcb_config(CONFIG).model_copy(
        update={"data_root": str(rgb_npz), "train_limit": None, "eval_limit": 100}
    )
    sets = held_out_sets(config)
    data = qcb_dataset(config)
    np.testing.assert_array_equal(sets.x, data.x_test[100:])
    target = config.attack_params["target_label"]
    assert len(sets.triggered) == int(np.sum(data.y_test[100:] != target))  # ASR's images
    with pytest.raises(SystemExit, match="none is held out"):
        held_out_sets(config.model_copy(update={"eval_limit": None}))
