"""A defense from another package joins ``run``, ``audit`` and the report with no edit here.

The toy package lives in a temporary folder outside the tree and is found the way an installed
third-party package would be: a ``.dist-info`` folder with an entry point in the
``blindspots.defenses`` group. Each command runs in a fresh process with that folder on
``PYTHONPATH``, so nothing in this test process registers the defense for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = "toy_prior"

TOY_MODULE = '''
"""A toy defense: flags labels that take an outsized share of clean predictions."""

import numpy as np
from pydantic import BaseModel, Field

from defenses.base import DEFENSES, Defense, Finding, Group, Need


class ToyPriorParams(BaseModel):
    factor: float = Field(2.0, gt=1.0)


@DEFENSES.register("toy_prior")
class ToyPrior(Defense):
    name = "toy_prior"
    group = Group.MODEL_INSPECTION
    needs = frozenset({Need.LOGITS})
    Params = ToyPriorParams
    paper = "none (a plug-in test)"
    default_in = frozenset({"run", "audit"})

    def _run(self, adapter, data, rng):
        predicted = adapter.predict(data.clean_x)
        share = np.bincount(predicted, minlength=data.num_classes) / len(predicted)
        flagged = [int(k) for k in np.flatnonzero(share > self.params.factor / data.num_classes)]
        return Finding(
            detected=bool(flagged) if data.target_label is None else data.target_label in flagged,
            score=float(share.max()),
            score_name="largest_prediction_share",
            flagged_labels=flagged,
            details={"share": share.tolist()},
        )


try:  # the figure registers beside its drawer, when the report side is importable
    from harness.report.figures.catalog import panel_figure
except ImportError:
    pass
else:

    @panel_figure("toy_prior", title="Toy prior: prediction share per label", caption="Bars.")
    def draw_share(ax, ev):
        share = (ev.result or {}).get("details", {}).get("share", [])
        ax.bar(range(len(share)), share)
'''

ENTRY_POINTS = f"[blindspots.defenses]\n{NAME} = toy_blindspots_defense\n"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the toy package and its distribution metadata (as pip would leave)."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "toy_blindspots_defense.py").write_text(textwrap.dedent(TOY_MODULE))
    info = folder / "toy_blindspots_defense-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toy-blindspots-defense\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return folder


def _blindspots(plugin_path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)])}
    command = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _python(plugin_path: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_entry_point_puts_the_defense_in_the_registry_and_the_default_lists(plugin_path):
    listed = json.loads(
        _python(
            plugin_path,
            "import json; from defenses.base import DEFENSES, default_defenses; "
            "print(json.dumps([DEFENSES.names(), default_defenses('run'), "
            "default_defenses('audit'), default_defenses('qcb')]))",
        )
    )
    names, run, audit, qcb = listed
    assert NAME in names
    assert run[-1] == NAME and audit[-1] == NAME  # after the built-ins, in their order
    assert NAME not in qcb  # it did not declare qcb
    assert run[:5] == [
        "neural_cleanse",
        "activation_clustering",
        "spectral_signatures",
        "strip",
        "fine_pruning",
    ]


def test_the_out_of_tree_defense_runs_in_run_audit_and_the_report(plugin_path, tmp_path):
    config = tmp_path / "toy.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            dataset = "digits"
            model = "small_cnn"
            precisions = ["fp32", "int8-static"]
            defenses = ["strip", "{NAME}"]
            clean_control = false
            eval_limit = 100
            threads = 1
            [attack_params]
            patch_size = 3
            poison_rate = 0.1
            target_label = 0
            [training]
            epochs = 3
            batch_size = 64
            [defense_params.strip]
            n_overlays = 8
            n_test = 20
            """
        )
    )
    run = _blindspots(plugin_path, "run", "--config", str(config), "--out", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").open()]
    assert {r["precision"] for r in records} == {"fp32", "int8-static"}
    for record in records:
        result = record["defenses"][NAME]
        assert result["status"] == "ok" and result["score_name"] == "largest_prediction_share"

    # The report, rebuilt in a fresh process that never ran the defense: its column and its
    # figure are there (the figure registered when the report asked the catalog about it).
    shutil.rmtree(tmp_path / "run" / "plots", ignore_errors=True)
    report = _blindspots(plugin_path, "report", "run", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    markdown = (tmp_path / "run" / "report.md").read_text()
    headers = [line for line in markdown.splitlines() if line.startswith("| precision |")]
    assert headers and all(f"| {NAME} |" in line for line in headers)
    figures = sorted(p.name for p in (tmp_path / "run" / "plots").glob(f"{NAME}-*.png"))
    assert figures, sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())

    (artifact,) = (tmp_path / "run" / "artifacts").glob("*/poisoned/exported.onnx")
    audit = _blindspots(
        plugin_path, "audit", str(artifact), "--defenses", NAME, "--out", "audit", cwd=tmp_path
    )
    assert audit.returncode == 0, audit.stderr[-2000:]
    verdicts = json.loads((tmp_path / "audit" / "audit.json").read_text())["cells"][0]["defenses"]
    assert verdicts[NAME]["verdict"] in {"clean", "suspicious", "inconclusive"}
    assert verdicts[NAME]["result"]["defense"] == NAME
