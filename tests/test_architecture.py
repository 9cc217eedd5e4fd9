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

ROOT = Path(__file__).resolve().parents[1]
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
print(json.dumps({m: m in sys.modules for m in ("torch", "onnxruntime")}))
"""


def test_light_entry_points_load_no_torch_and_no_onnxruntime():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("datasets: ") and "models: cifar_cnn" in done.stdout
    assert json.loads(lines[-1]) == {"torch": False, "onnxruntime": False}
