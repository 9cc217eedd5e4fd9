"""The tree's floors hold (import-linter's contracts in .importlinter) and light entry points
stay light: the core, exporters, defenses, the report and ``blindspots list`` load no torch and
no onnxruntime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in ("harness", "defenses", "exporters"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_its_floors(tree_copy):
    result = _lint(tree_copy)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("harness/core/metrics.py", "import torch\n", "The core floor loads no torch"),
        ("defenses/strip.py", "import onnx\n", "Defenses talk to a deployed model"),
        ("harness/runtime/sanity.py", "import harness.pipeline.store\n", "Floors"),
    ],
)
def test_a_planted_violation_fails_the_check(tree_copy, module, planted, contract):
    path = tree_copy / module
    path.write_text(path.read_text() + "\n" + planted)
    result = _lint(tree_copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and contract in result.stdout


PROBE = """
import json, sys
import harness.core, harness.artifacts, exporters, exporters.catalog, defenses, harness.report
from harness.cli import main
main(["list"])
print(json.dumps({m: m in sys.modules for m in ("torch", "onnxruntime", "distributed")}))
"""


def test_light_entry_points_load_no_torch_no_onnxruntime_and_no_dask():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("datasets: ") and "models: cifar_cnn" in done.stdout
    loaded = json.loads(lines[-1])
    assert loaded == {"torch": False, "onnxruntime": False, "distributed": False}


# --- typed seams ---------------------------------------------------------------------------
SEAM_CHECK = """
from typing import Any

import numpy as np

from defenses.deployed import DeployedModel
from defenses.strip import Strip
from harness.runtime.adapter import RuntimeAdapter


def the_adapter_is_a_deployed_model(adapter: RuntimeAdapter) -> DeployedModel:
    return adapter


def strip_params_are_typed(defense: Strip) -> float:
    return defense.params.frr


class LogitsOnly:
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return pixels


def PLANTED(model: LogitsOnly) -> DeployedModel:
    return model
"""


def _mypy(source: str, tmp_path: Path) -> tuple[int, str]:
    from mypy import api

    module = tmp_path / "seam_check.py"
    module.write_text(source)
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(module),
        ]
    )
    return status, stdout + stderr


def test_the_type_checker_holds_both_sides_of_the_defense_seam(tmp_path, monkeypatch):
    """The adapter satisfies :class:`DeployedModel`, a defense's params are its own model's type,
    and an object with half the seam is refused — by mypy, as ``make test`` runs it."""
    monkeypatch.chdir(ROOT)
    status, output = _mypy(SEAM_CHECK, tmp_path)
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 1, output
    line = SEAM_CHECK.splitlines().index("    return model") + 1
    assert f"seam_check.py:{line}:" in errors[0] and "DeployedModel" in errors[0]
    status, output = _mypy(SEAM_CHECK.replace("    return model", "    return None"), tmp_path)
    assert status == 1 and "DeployedModel" in output  # still wrong: None is not a model
    clean = SEAM_CHECK[: SEAM_CHECK.index("class LogitsOnly")]
    status, output = _mypy(clean, tmp_path)
    assert status == 0, output
