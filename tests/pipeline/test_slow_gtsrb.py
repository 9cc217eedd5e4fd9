"""Real-data run (slow, excluded from CI's default run): the GTSRB benchmark's headline claims.

Run with ``.venv/bin/python -m pytest -m slow tests/pipeline/test_slow_gtsrb.py`` (about 20 minutes on
2 cores). Uses the shared 32×32 GTSRB ``.npz`` next to the checkout and skips if it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.pipeline.config import load_config
from harness.pipeline.runner import run_experiment
from harness.report.document import write_report

ROOT = Path(__file__).resolve().parents[2]
GTSRB = ROOT.parent / "shared" / "data" / "gtsrb32.npz"


@pytest.mark.slow
@pytest.mark.skipif(not GTSRB.is_file(), reason=f"real data not found at {GTSRB}")
def test_gtsrb_badnet_accuracy_and_attack_success_per_precision(tmp_path):
    config = load_config(
        ROOT / "configs" / "grids" / "gtsrb_badnet.toml", {"data_root": str(GTSRB), "defenses": []}
    )
    run_experiment(config, tmp_path, log=lambda _: None)
    report = json.loads(write_report(tmp_path)["json"].read_text())
    runs = {(r["poisoned"], r["precision"]): r for r in report["runs"]}
    assert runs[(True, "fp32")]["clean_acc"] >= 0.95
    assert runs[(True, "fp32")]["asr"] >= 0.99
    assert runs[(False, "fp32")]["asr"] <= 0.02
    for precision in ("int8-dynamic", "int8-static"):
        assert runs[(True, precision)]["asr"] >= 0.99
        assert runs[(True, precision)]["agreement_fp32"] >= 0.99
    assert runs[(True, "int4")]["agreement_fp32"] >= 0.95
