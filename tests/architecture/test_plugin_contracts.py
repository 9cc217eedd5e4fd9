"""Contracts every registered plug-in must keep, checked by looping over the registries, so a
new attack, precision or defense is covered the moment it registers."""

from __future__ import annotations

import numpy as np
import pytest

from defenses.base import DEFENSES, DefenseData, Status, Verdict, build_defense
from exporters.catalog import PRECISIONS
from exporters.quantization import quantize
from harness.attacks.base import ATTACKS, build_attack
from harness.runtime.adapter import RuntimeAdapter

# Small budgets so the whole contract suite stays fast; a defense not listed runs its defaults.
QUICK_PARAMS = {
    "neural_cleanse": {
        "steps": 4,
        "n_samples": 32,
        "batch_size": 16,
        "n_eval": 32,
        "parity_samples": 64,
    },
    "strip": {"n_overlays": 8, "n_test": 40},
    "deployment_diff": {"n_candidates": 16, "n_screen": 8, "n_eval": 40, "stimulus_positions": 1},
}
#: (defense, precision) cells with nothing to do: the differential check compares a quantized
#: file with its FP32 reference, so on the FP32 file itself it must say not_applicable.
NOTHING_TO_COMPARE = {("deployment_diff", "fp32")}
VOLATILE = {"wall_time_s"}
SHIPPED_DEFENSES = [
    n for n in DEFENSES.names() if DEFENSES.get(n).__module__.startswith("defenses.")
]
"""Every defense the package registers (test modules may register throwaway plug-ins too)."""


def _data(world) -> DefenseData:
    return DefenseData(
        num_classes=10,
        clean_x=world.x_test[:200],
        clean_y=world.y_test[:200],
        train_x=world.x_train,
        train_y=world.y_train,
        poison_mask=world.poison_mask,
        triggered_x=world.triggered_x[:100],
        target_label=world.target,
        poison_rate=0.1,
        reference=RuntimeAdapter.from_path(world.poisoned["fp32"], threads=1),
    )


@pytest.mark.parametrize("name", SHIPPED_DEFENSES)
@pytest.mark.parametrize("precision", ["fp32", "int8-static"])
def test_every_defense_runs_is_deterministic_and_fills_its_result(digits_world, name, precision):
    def run():
        adapter = RuntimeAdapter.from_path(digits_world.poisoned[precision], threads=1)
        defense = build_defense(name, QUICK_PARAMS.get(name))
        return defense.run(adapter, _data(digits_world), np.random.default_rng(7))

    first, second = run(), run()
    if (name, precision) in NOTHING_TO_COMPARE:
        assert first.status == Status.NOT_APPLICABLE and first.reason
        return
    assert first.status == Status.OK, first.reason
    assert first.verdict in set(Verdict)
    if first.verdict == Verdict.INCONCLUSIVE:
        assert first.detected is None and first.verdict_reason
    else:
        assert first.detected == (first.verdict == Verdict.DETECTED)
    assert first.defense == name
    assert first.queries > 0
    assert first.wall_time_s > 0
    assert first.params  # the validated parameters actually used
    dump = first.model_dump(mode="json", exclude=VOLATILE)
    assert dump == second.model_dump(mode="json", exclude=VOLATILE)
    if first.per_sample_scores is not None:
        np.testing.assert_array_equal(first.per_sample_scores, second.per_sample_scores)


@pytest.mark.parametrize("name", SHIPPED_DEFENSES)
def test_every_defense_rejects_unknown_parameters(name):
    from harness.core.errors import BlindspotsError

    with pytest.raises(BlindspotsError, match=name):
        build_defense(name, {"no_such_parameter": 1})


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_poisons_deterministically_in_pixel_space(digits_world, name):
    attack = build_attack(name, {"poison_rate": 0.1, "target_label": 3})
    x, y = digits_world.clean_x_train, digits_world.clean_y_train
    a = attack.poison(x, y, np.random.default_rng(1))
    b = attack.poison(x, y, np.random.default_rng(1))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.poison_mask, b.poison_mask)
    assert a.x.dtype == np.uint8 and a.x.shape == x.shape
    assert a.poison_mask.sum() == round(0.1 * len(x))
    assert np.all(a.y[a.poison_mask] == 3)
    untouched = ~a.modified_mask  # WaNet also warps (unrelabelled) noise-mode cross samples
    np.testing.assert_array_equal(a.x[untouched], x[untouched])
    assert np.all(y[a.poison_mask] != 3)
    triggered, labels = attack.triggered_test_set(digits_world.x_test, digits_world.y_test)
    assert np.all(labels != 3) and len(triggered) == np.sum(digits_world.y_test != 3)


@pytest.mark.parametrize("name", PRECISIONS.names())
def test_every_precision_yields_a_runnable_artifact_close_to_fp32(digits_world, name, tmp_path):
    source = digits_world.poisoned["fp32"].with_name("exported.onnx")
    artifact = quantize(name, source, tmp_path / f"{name}.onnx", digits_world.clean_x_train[:128])
    adapter = RuntimeAdapter.from_path(artifact.path)
    reference = RuntimeAdapter.from_path(source)
    assert adapter.precision == name
    agreement = np.mean(
        adapter.predict(digits_world.x_test) == reference.predict(digits_world.x_test)
    )
    assert agreement >= 0.9
    assert set(adapter.layers) == {"penultimate", "last_conv"}
