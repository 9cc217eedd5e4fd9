"""``pip install .`` as a user would run it, into fresh virtual environments (minutes each, so
marked ``install``: `make test-install`, and .ci/run, run them).

* Python 3.11, into an environment that already holds torch and another numpy minor release
  than constraints.txt's: the ranges must resolve without replacing either, and the installed
  package must train, export, quantize and evaluate a model.
* Python 3.12 and 3.13: PyPI's only Linux torch for them is the multi-GB CUDA build, and this
  machine holds a CPU wheel for 3.11 only. So the resolver is run over the whole dependency set,
  torch included, by metadata (``--dry-run``: nothing downloaded), then everything it chose
  except torch and its CUDA libraries is installed, and the torch-free part of the package runs
  (tests/architecture/install_smoke.py: intake, INT8 quantization and onnxruntime inference of a vendor's
  ONNX file). Training, Neural Cleanse and the replica are not run on these interpreters.

The interpreters are found on PATH or under pyenv; BLINDSPOTS_REQUIRE_PYTHONS=1 (set by .ci/run)
turns a missing one into a failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
OTHER_NUMPY = "2.3.5"  # constraints.txt has 2.4.6
# torch's own CUDA stack: what the 3.12/3.13 checks leave out (see the module docstring)
TORCH_STACK = ("torch", "triton", "nvidia-", "cuda-")


def _source(tmp: Path) -> Path:
    """A copy of what the wheel is built from, so the build leaves nothing in the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("harness", "exporters", "defenses"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _interpreter(version: str) -> str | None:
    """A real interpreter: pyenv's shims exist for every version but run only the selected one."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(pyenv.glob(f"{version}.*"), reverse=True):
        if (candidate / "bin" / "python3").exists():
            return str(candidate / "bin" / "python3")
    found = shutil.which(f"python{version}")
    return found if found and "/shims/" not in found else None


def _venv(python: str, path: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=False
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _pip(python: Path, *args: str | Path) -> str:
    return _run(python, "-m", "pip", "install", "--quiet", *args)


def test_pip_install_beside_torch_and_another_numpy_minor(tmp_path):
    python = _venv(sys._base_executable, tmp_path / "venv")
    _pip(python, "torch==2.13.0", f"numpy=={OTHER_NUMPY}")  # the user's environment
    _pip(python, _source(tmp_path))
    versions = _run(
        python, "-c", "import numpy, torch; print(numpy.__version__, torch.__version__)"
    )
    assert versions.split()[0] == OTHER_NUMPY, versions
    assert versions.split()[1].startswith("2.13.0"), versions
    work = tmp_path / "work"
    work.mkdir()

    def cli(*args: str) -> str:
        return _run(python.parent / "blindspots", *args, "--dataset", "digits", cwd=work)

    cli("train", "--epochs", "10", "--batch-size", "64", "--out", "m.pt")
    cli("export", "--state", "m.pt", "--out", "m.onnx")
    cli("quantize", "--model", "m.onnx", "--precision", "int8-static", "--out", "m8.onnx")
    result = json.loads(cli("evaluate", "--model", "m8.onnx", "--reference", "m.onnx"))
    assert result["clean_acc"] > 0.9 and result["agreement_fp32"] > 0.9
    assert result["attack"]["from"] == "model metadata" and result["asr"] > 0.9
    smoke = _run(python, ROOT / "tests" / "architecture" / "install_smoke.py", tmp_path / "smoke")
    assert json.loads(smoke.splitlines()[-1])["numpy"] == OTHER_NUMPY


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_pip_install_on_newer_python_without_torch(tmp_path, version):
    interpreter = _interpreter(version)
    if interpreter is None:
        if os.environ.get("BLINDSPOTS_REQUIRE_PYTHONS"):
            pytest.fail(f"no Python {version} interpreter on PATH or under pyenv")
        pytest.skip(f"no Python {version} interpreter on PATH or under pyenv")
    python = _venv(interpreter, tmp_path / "venv")
    src = _source(tmp_path)
    report = tmp_path / "resolution.json"
    # the whole resolution, torch included, from metadata only
    _pip(python, "--dry-run", "--ignore-installed", "--report", report, src)
    chosen = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "torch" in chosen and chosen["torch"].split(".")[0] == "2", chosen
    rest = [
        f"{name}=={v}"
        for name, v in chosen.items()
        if not name.startswith(TORCH_STACK) and name != "quant-blindspots"
    ]
    _pip(python, "--no-deps", *rest)
    _pip(python, "--no-deps", src)
    listing = _run(python.parent / "blindspots", "list")
    assert "int8-static" in listing
    smoke = json.loads(
        _run(
            python, ROOT / "tests" / "architecture" / "install_smoke.py", tmp_path / "smoke"
        ).splitlines()[-1]
    )
    assert smoke["python"].startswith(version) and smoke["torch_loaded"] is False
