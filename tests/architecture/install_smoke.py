"""What an installed package must do without torch (run by tests/architecture/test_install.py in a fresh
venv; where no CPU torch wheel exists for the interpreter, as for Python 3.13 on this machine,
this is the part of the package that can run there).

    python tests/architecture/install_smoke.py WORKDIR

A vendor's ONNX file made with scikit-learn (examples/vendor_digits_mlp.py, no torch) is read as
untrusted, brought into the harness's contract, quantized to INT8 (static, calibrated) with the
package's quantizer, and both files are run with onnxruntime: the INT8 file must agree with the
FP32 one on almost every digit. Prints one JSON line of versions and numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporters.quantization import quantize
from harness.artifacts.intake import IntakeOverrides, intake
from harness.data.base import load_dataset
from harness.runtime.model_safety import load_untrusted

ROOT = Path(__file__).resolve().parents[2]


def predict(path: Path, images: np.ndarray, preprocessing) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    x = preprocessing.apply(images)
    if isinstance(batch, int):  # fixed batch: feed in slices of that size
        out = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        return np.concatenate(out).argmax(axis=1)
    return session.run(None, {name: x})[0].argmax(axis=1)


def main(workdir: str) -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    vendor = work / "vendor.onnx"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "vendor_digits_mlp.py"), str(vendor)], check=True
    )
    contract = intake(load_untrusted(vendor), IntakeOverrides(mean=[0.0], std=[1.0], layout="NHWC"))
    fp32 = work / "contract.onnx"
    onnx.save(contract.model, fp32)
    data = load_dataset("digits")
    int8 = work / "int8-static.onnx"
    quantize("int8-static", fp32, int8, data.x_train[:256], preprocessing=contract.preprocessing)
    ref = predict(fp32, data.x_test, contract.preprocessing)
    got = predict(int8, data.x_test, contract.preprocessing)
    result = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "fp32_acc": float((ref == data.y_test).mean()),
        "int8_agreement": float((got == ref).mean()),
        "torch_loaded": "torch" in sys.modules,
    }
    print(json.dumps(result))
    return 0 if result["fp32_acc"] > 0.8 and result["int8_agreement"] > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
