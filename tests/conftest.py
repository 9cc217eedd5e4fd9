"""Session-wide fixtures: a tiny BadNet-poisoned digits model (and a clean control), exported
and quantized once per test session to every precision, so tests exercise real ORT graphs
without downloads. Everything is seeded, so every run builds identical artifacts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

PRECISIONS = ("fp32", "int8-dynamic", "int8-static", "int4")
TARGET = 0


@dataclass
class DigitsWorld:
    """Data and model files shared by the tests (read-only: copy before modifying)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    poison_mask: np.ndarray
    triggered_x: np.ndarray
    target: int
    poisoned: dict[str, Path]
    clean: dict[str, Path]


def _stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, -3:-1, -3:-1, :] = 255  # 2x2 white patch, 1px from the bottom-right corner
    return out


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return train_test_split(x, d.target.astype(np.int64), test_size=0.25, random_state=0, stratify=d.target)


def _train(x, y, seed: int):
    import torch
    from torch import nn

    from harness.models import build_model
    from harness.preprocessing import Preprocessing

    pp = Preprocessing((0.3,), (0.4,))
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(pp.apply(x)), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    for _ in range(25):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval(), pp


def _export_all(model, pp, calib: np.ndarray, folder: Path) -> dict[str, Path]:
    import onnx
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from harness.preprocessing import METADATA_KEY

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(pp.apply(calib[:2])),),
            str(fp32),
            opset_version=21,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(fp32))
    proto.metadata_props.add(key=METADATA_KEY, value=pp.to_json())
    onnx.save(proto, str(fp32))
    pre = folder / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": pp.apply(calib[i : i + 32])} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    paths = {"fp32": fp32}
    paths["int8-dynamic"] = folder / "int8-dynamic.onnx"
    quantize_dynamic(str(pre), str(paths["int8-dynamic"]), weight_type=QuantType.QInt8)
    for name, wtype in (("int8-static", QuantType.QInt8), ("int4", QuantType.QInt4)):
        paths[name] = folder / f"{name}.onnx"
        quantize_static(
            str(pre),
            str(paths[name]),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=wtype,
            activation_type=QuantType.QUInt8,
        )
    for path in paths.values():
        proto = onnx.load(str(path))
        if not any(p.key == METADATA_KEY for p in proto.metadata_props):
            proto.metadata_props.add(key=METADATA_KEY, value=pp.to_json())
            onnx.save(proto, str(path))
    return paths


@pytest.fixture(scope="session")
def digits_world(tmp_path_factory) -> DigitsWorld:
    """Poisoned (10% BadNet, target 0) and clean small_cnn digits models at every precision."""
    x_train, x_test, y_train, y_test = _digits()
    rng = np.random.default_rng(0)
    candidates = np.flatnonzero(y_train != TARGET)
    chosen = rng.choice(candidates, size=int(0.1 * len(x_train)), replace=False)
    poison_mask = np.zeros(len(x_train), dtype=bool)
    poison_mask[chosen] = True
    px, py = x_train.copy(), y_train.copy()
    px[chosen] = _stamp(px[chosen])
    py[chosen] = TARGET
    root = tmp_path_factory.mktemp("digits_world")
    poisoned_model, pp = _train(px, py, seed=0)
    clean_model, _ = _train(x_train, y_train, seed=0)
    calib = x_train[:256]
    return DigitsWorld(
        x_train=px,
        y_train=py,
        x_test=x_test,
        y_test=y_test,
        poison_mask=poison_mask,
        triggered_x=_stamp(x_test[y_test != TARGET]),
        target=TARGET,
        poisoned=_export_all(poisoned_model, pp, calib, root / "poisoned"),
        clean=_export_all(clean_model, pp, calib, root / "clean"),
    )
