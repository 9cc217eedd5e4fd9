"""README's demo table is the demo's output: generated from ``tests/report/golden/demo.json`` (fast
check), and that stored copy is what ``blindspots demo`` computes today (one demo run, about
90 s on 2 cores: the suite's only full demo)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from harness.cli import main
from harness.cli.demo import demo_tables_equal, render_demo

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "tools" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_block_is_the_stored_demo_reports_table():
    tool = _tool()
    stored = json.loads(tool.GOLDEN.read_text())
    readme = tool.README.read_text()
    assert tool.readme_block(readme) == render_demo(stored).rstrip("\n")
    assert tool.main(["check"]) == 0
    # an edited number in the README is caught
    edited = readme.replace("| fp32 | poisoned | ", "| fp32 | poisoned | 9", 1)
    assert tool.readme_block(edited) != render_demo(stored).rstrip("\n")


def test_the_table_shows_a_surviving_backdoor_a_detection_and_the_sleeping_qcb():
    """What the README promises of the demo, read from the numbers rather than the prose."""
    stored = json.loads(_tool().GOLDEN.read_text())
    poisoned = [r for r in stored["badnet"]["summary"] if r["poisoned"]]
    assert {r["precision"] for r in poisoned} == {"fp32", "int8-dynamic", "int8-static", "int4"}
    assert min(r["asr_mean"] for r in poisoned) > 0.9
    assert any(d["detected"] for r in poisoned for d in r["defenses"].values())
    qcb = stored["qcb"]["seeds"][0]
    assert qcb["fp32/exact"]["qcb_asr"] < 0.1 < 0.9 < qcb["int8-static/exact"]["qcb_asr"]
    diff = stored["qcb"]["verdicts"]["deployment_diff"]
    assert diff["int8-static/qcb"]["detected"] == 1 and diff["int8-static/clean"]["detected"] == 0


def test_demo_computes_the_stored_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    fresh = json.loads((tmp_path / "demo" / "demo.json").read_text())
    stored = json.loads(_tool().GOLDEN.read_text())
    assert demo_tables_equal(fresh, stored) == [], (
        "the demo's table changed: rerun `make demo` and `python tools/demo_table.py readme "
        "runs/demo`, and say why in the commit"
    )
    assert render_demo(fresh) in capsys.readouterr().out
