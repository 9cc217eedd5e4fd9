"""Runtime adapter: what every defense relies on, on every precision's real ORT graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from harness.artifacts.preprocessing import Preprocessing
from harness.core.errors import ModelError
from harness.core.metrics import batch_dependence
from harness.runtime.adapter import RuntimeAdapter, infer_precision, preprocessing_from_metadata
from tests.conftest import PRECISIONS


@pytest.fixture(scope="module")
def adapters(digits_world):
    return {p: RuntimeAdapter.from_path(digits_world.poisoned[p]) for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_activation_discovery_on_every_precision(adapters, digits_world, precision):
    adapter = adapters[precision]
    assert adapter.layers == ["last_conv", "penultimate"]
    acts = adapter.activations(digits_world.x_test[:20])
    # small_cnn: last conv has 32 channels at 4x4 (8x8 input, one pool); hidden FC has 64 units.
    assert acts["last_conv"].shape == (20, 32, 4, 4)
    assert acts["penultimate"].shape == (20, 64)
    for value in acts.values():
        assert value.dtype == np.float32
        assert value.min() >= 0.0  # both are post-ReLU
        assert value.max() > 0.0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_activations_match_fp32_within_quantization_error(adapters, digits_world, precision):
    x = digits_world.x_test[:50]
    ref = adapters["fp32"].activations(x)["penultimate"]
    got = adapters[precision].activations(x)["penultimate"]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < (0.3 if precision == "int4" else 0.1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_probing_does_not_change_the_logits(adapters, digits_world, precision):
    """Exposing activations must not alter the deployed arithmetic (e.g. break QDQ fusion)."""
    adapter = adapters[precision]
    x = digits_world.x_test[:64]
    plain = adapter.logits(x)
    adapter.activations(x)
    probed = adapter._forward(adapter._probe_session, [adapter._logits_name], x, None)[0]
    np.testing.assert_array_equal(plain, probed)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_masked_channels_are_zero_and_others_untouched(adapters, digits_world, precision):
    adapter = adapters[precision]
    x = digits_world.x_test[:30]
    before = adapter.activations(x, ["last_conv"])["last_conv"]
    keep = np.ones(adapter.last_conv_channels, dtype=bool)
    keep[::3] = False
    masked = adapter.with_channels_masked(keep)
    after = masked.activations(x, ["last_conv"])["last_conv"]
    assert np.all(after[:, ~keep] == 0.0)
    np.testing.assert_array_equal(after[:, keep], before[:, keep])
    assert not np.allclose(masked.logits(x), adapter.logits(x))
    # masking every channel leaves only the classifier biases: all inputs give the same logits
    all_off = adapter.with_channels_masked(np.zeros_like(keep)).logits(x)
    np.testing.assert_allclose(all_off, np.broadcast_to(all_off[0], all_off.shape), atol=1e-5)


def test_mask_of_wrong_length_is_rejected(adapters):
    with pytest.raises(ModelError, match="channel mask must have 32 entries"):
        adapters["fp32"].with_channels_masked(np.ones(5, dtype=bool))


def test_queries_are_counted_across_masked_copies(digits_world):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    adapter.logits(digits_world.x_test[:10])
    masked = adapter.with_channels_masked(np.ones(adapter.last_conv_channels, dtype=bool))
    before = adapter.counter.images
    masked.logits(digits_world.x_test[:7])
    assert adapter.counter.images == before + 7


def test_dynamic_int8_runs_per_sample_by_default(adapters, digits_world):
    assert adapters["int8-dynamic"].runs_per_sample(None)
    assert not adapters["int8-static"].runs_per_sample(None)
    # a batch with one saturated outlier changes batch-mates' outputs under dynamic quantization
    x = digits_world.x_test[:32].copy()
    x[0] = 255
    dep = batch_dependence(adapters["int8-dynamic"], x, batch_size=32)
    assert dep.max_abs_logit_diff > 0.0
    static_dep = batch_dependence(adapters["int8-static"], x, batch_size=32)
    assert static_dep.max_abs_logit_diff < 1e-4


def test_float_pixels_match_uint8_pixels(adapters, digits_world):
    x = digits_world.x_test[:16]
    np.testing.assert_allclose(
        adapters["fp32"].logits(x), adapters["fp32"].logits(x.astype(np.float32)), rtol=1e-6
    )


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_is_inferred_from_the_graph(digits_world, precision):
    assert infer_precision(onnx.load(str(digits_world.poisoned[precision]))) == precision


def test_bad_inputs_raise_one_line_errors(tmp_path, adapters, digits_world):
    with pytest.raises(ModelError, match="model file not found"):
        RuntimeAdapter.from_path(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        RuntimeAdapter.from_path(junk)
    with pytest.raises(ModelError, match="NHWC"):
        adapters["fp32"].logits(digits_world.x_test[:2, :, :, 0])
    with pytest.raises(ModelError, match="1 channel"):
        adapters["fp32"].logits(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ModelError, match="layer"):
        adapters["fp32"].activations(digits_world.x_test[:2], ["conv1"])


def test_models_without_metadata_need_explicit_preprocessing(tmp_path, digits_world):
    proto = onnx.load(str(digits_world.poisoned["fp32"]))
    shipped = preprocessing_from_metadata(proto)
    del proto.metadata_props[:]
    path = tmp_path / "vendor.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="metadata"):
        RuntimeAdapter.from_path(path)
    vendor = RuntimeAdapter.from_path(path, preprocessing=Preprocessing(shipped.mean, shipped.std))
    reference = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    np.testing.assert_array_equal(
        vendor.logits(digits_world.x_test[:8]), reference.logits(digits_world.x_test[:8])
    )
