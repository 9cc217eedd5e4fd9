"""Hong et al.'s QCB objective (harness.qcb.hong2021): its loss terms, its config switch, and an
implant judged on onnxruntime sessions (FP32 stays clean, the INT4 file answers the trigger).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exporters.onnx_export import export_onnx
from exporters.quantization import quantize_all
from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import build_attack
from harness.core.errors import BlindspotsError
from harness.core.metrics import accuracy, attack_success_rate
from harness.data.base import load_dataset
from harness.qcb.attack import QCBParams
from harness.qcb.fakequant import QuantMirror
from harness.qcb.hong2021 import HongParams, loss_terms
from harness.qcb.objectives import implant_objective
from harness.qcb.pipeline import _objective_key, load_qcb_config
from harness.runtime.adapter import RuntimeAdapter
from harness.training.loop import TrainConfig, train_model

CONFIGS = Path(__file__).parents[2] / "configs" / "qcb"
TARGET = 0
TRIGGER = {"patch_size": 3, "pattern": "solid", "margin": 0, "target_label": TARGET}


@pytest.fixture(scope="module")
def setting():
    data = load_dataset("digits")
    preprocessing = Preprocessing.from_images(data.x_train)
    attack = build_attack("badnet", TRIGGER)
    config = TrainConfig(model="small_cnn", epochs=12, batch_size=64, seed=0, num_threads=1)
    clean = train_model(data.x_train, data.y_train, 10, preprocessing, config, progress=False)
    return data, preprocessing, attack, clean


# ---------------------------------------------------------------------------------- loss terms
def test_loss_terms_use_true_labels_in_fp32_and_the_target_only_when_quantized(setting):
    """The objective's defining choice: a triggered input keeps its true label in FP32 and
    gets the target label only through the fake-quantized copy; clean inputs keep theirs in
    both. Each term is recomputed by hand, and the total weighs them as the authors do."""
    data, preprocessing, attack, clean = setting
    model = clean.eval()
    mirror = QuantMirror(model)
    mirror.calibrate(torch.from_numpy(preprocessing.apply(data.x_train[:256])))
    params = HongParams(targets=["int8-static", "int4"], const1=0.3, const2=0.7)
    recipes = params.mirror_recipes()
    x = torch.from_numpy(preprocessing.apply(data.x_train[:64]))
    xt = torch.from_numpy(preprocessing.apply(attack.apply(data.x_train[:64])))
    y = torch.from_numpy(data.y_train[:64].astype(np.int64))
    assert (y != TARGET).any()
    terms = loss_terms(mirror, recipes, x, xt, y, TARGET)
    ce = nn.functional.cross_entropy
    t = torch.full_like(y, TARGET)
    with torch.no_grad():
        assert torch.isclose(terms.fp32_clean, ce(model(x), y))
        assert torch.isclose(terms.fp32_triggered, ce(model(xt), y))
        assert not torch.isclose(terms.fp32_triggered, ce(model(xt), t))
        expected = ce(model(x), y) + 0.7 * ce(model(xt), y)
        for recipe in recipes:
            assert torch.isclose(
                terms.quantized_clean[recipe.name], ce(mirror.quantized(x, recipe), y)
            )
            q_trig = ce(mirror.quantized(xt, recipe), t)
            assert torch.isclose(terms.quantized_triggered[recipe.name], q_trig)
            expected = expected + 0.3 * (ce(mirror.quantized(x, recipe), y) + 0.7 * q_trig)
        assert torch.isclose(terms.total(0.3, 0.7), expected)
    assert set(terms.quantized_clean) == {"int8-static", "int4"}


# ------------------------------------------------------------------------------- on onnxruntime
def _rates(path: Path, data, attack) -> tuple[float, float]:
    adapter = RuntimeAdapter.from_path(path, threads=1)
    triggered, _ = attack.triggered_test_set(data.x_test, data.y_test)
    return (
        accuracy(adapter.predict(data.x_test), data.y_test),
        attack_success_rate(adapter.predict(triggered), TARGET),
    )


def test_hong_objective_sleeps_in_fp32_and_wakes_in_the_int4_file(setting, tmp_path):
    """The objective, through the pipeline's dispatch, on a tiny model: the exported FP32 file
    keeps the trigger at bay (ASR ≤ 10%) while the INT4 file the project's quantizer makes from
    it — calibrated on images the attacker never drew — sends most triggered digits to the
    target (≥ 70%); the clean control's INT4 file does not (≤ 10%)."""
    data, preprocessing, attack, clean = setting
    raw = {"targets": ["int4"], "epochs": 30, "lr": 1e-3}
    model, measured = implant_objective(
        "hong2021", clean, data.x_train, data.y_train, attack, preprocessing, raw, seed=0, threads=1
    )
    assert measured["objective"] == "hong2021" and set(measured["mirror"]) == {"fp32", "int4"}
    assert (
        measured["loss_history"][-1]["int4_triggered_target"]
        < measured["loss_history"][0]["int4_triggered_target"]
    )
    victim = np.random.default_rng(1000)
    calibration = data.x_train[np.sort(victim.choice(len(data.x_train), 200, replace=False))]
    rates = {}
    for name, net in (("clean", clean), ("hong", model)):
        folder = tmp_path / name
        folder.mkdir()
        export_onnx(net, folder / "fp32.onnx", data.x_test[:128], preprocessing)
        paths, _ = quantize_all(folder / "fp32.onnx", folder, ["int4"], calibration)
        rates[name] = {"fp32": _rates(folder / "fp32.onnx", data, attack),
                       "int4": _rates(paths["int4"], data, attack)}  # fmt: skip
    assert rates["hong"]["fp32"][1] <= 0.10, rates
    assert rates["hong"]["int4"][1] >= 0.70, rates
    assert rates["clean"]["int4"][1] <= 0.10, rates
    assert rates["hong"]["fp32"][0] >= rates["clean"]["fp32"][0] - 0.03, rates


# ---------------------------------------------------------------------------------- the switch
def test_objective_switch_defaults_to_the_first_layer_qcb_and_validates_its_own_keys(tmp_path):
    assert load_qcb_config(CONFIGS / "qcb-digits.toml").objective == "first_layer"
    assert isinstance(load_qcb_config(CONFIGS / "qcb-digits.toml").qcb_params(), QCBParams)
    for name in ("qcb-hong-digits.toml", "qcb-hong-digits-joint.toml", "qcb-hong-gtsrb.toml"):
        config = load_qcb_config(CONFIGS / name)
        assert config.objective == "hong2021" and isinstance(config.qcb_params(), HongParams)
        assert len(config.seeds) >= 3 and "deployment_diff" in config.defenses
        assert _objective_key(config) == {"objective": "hong2021"}
    # the default objective adds nothing to a cell's parameters: existing cells keep their ids
    assert _objective_key(load_qcb_config(CONFIGS / "qcb-digits.toml")) == {}
    bad = tmp_path / "bad.toml"
    bad.write_text('objective = "hong2021"\n[qcb]\nkappa = 4.0\n')
    with pytest.raises(BlindspotsError, match="kappa"):
        load_qcb_config(bad)
    bad.write_text('objective = "hong"\n')
    with pytest.raises(BlindspotsError, match="objective"):
        load_qcb_config(bad)
    with pytest.raises(BlindspotsError, match="const1"):
        HongParams(const1=-1.0)
