"""The report built from a store alone: golden report.md, a self-contained report.html with
every evidence plot, and no undecided cell drawn as a zero.

The store is made by hand through :class:`~harness.pipeline.store.ResultStore` (no training): 2
seeds ×
poisoned/clean × fp32/int8-static, with defense results shaped like the real defenses' (NC
anomaly indices and reversed triggers, STRIP entropies, AC per-class clusters, SS scores,
Fine-Pruning curves). STRIP is inconclusive on the poisoned int8-static cells and NC not
applicable on the clean int8-static cells.

Regenerate the golden file after an intended change with
``BLINDSPOTS_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/report/test_report.py -k golden``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

import harness.report.document as report_module
import harness.report.figures.model as figure_model
import harness.report.tables as tables_module
from harness.attacks.base import build_attack
from harness.core.atomic import PARTIAL_MARK
from harness.core.metrics import wilson_interval
from harness.core.verdicts import record_verdict
from harness.pipeline.store import ResultStore
from harness.report.data import build_report, group_summary, report_groups
from harness.report.document import write_report
from harness.report.figures.evidence import (
    CellArrays,
    defense_evidence,
    evidence_seed,
    rebuild_attack,
)
from harness.report.figures.model import Evidence, Plot
from harness.report.figures.panels import (
    draw_ac,
    draw_fine_pruning,
    draw_nc_anomaly,
    draw_ss_z,
    draw_strip,
)
from harness.report.figures.plots import (
    accuracy_figure,
    detection_figure,
    draw_panel,
    trigger_figure,
)
from harness.report.render import render_markdown
from harness.report.tables import runs_table

GOLDEN = Path(__file__).parent / "golden" / "report.md"
REGEN = os.environ.get("BLINDSPOTS_REGEN_GOLDEN") == "1"
SLUG = "digits-small_cnn-badnet"
PRECISIONS = ["fp32", "int8-static"]
DEFENSES = [
    "neural_cleanse",
    "strip",
    "activation_clustering",
    "spectral_signatures",
    "fine_pruning",
]
LABELS = 10
TARGET = 0
N_TRAIN = 200
ATTACK_PARAMS = build_attack(
    "badnet", {"patch_size": 2, "poison_rate": 0.1, "target_label": TARGET}
).describe()["params"]
CONFIG = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    "attack_params": {"patch_size": 2, "poison_rate": 0.1, "target_label": TARGET},
    "seeds": [0, 1],
    "precisions": PRECISIONS,
    "clean_control": True,
    "defenses": DEFENSES,
    "int8_kernels": "exact",
}
ENVIRONMENT = {
    "blindspots": "0.1.0",
    "python": "3.11.9",
    "torch": "2.13.0",
    "onnx": "1.23.2",
    "onnxruntime": "1.31.1",
    "cpu_isa": {"avx2": True, "avx512_vnni": False},
    "int8_kernels": {
        "kernel_class": "exact-int32",
        "profiles_differ": False,
        "exact_verified": True,
    },
}


def _r(value: float) -> float:
    return round(float(value), 4)


def _base(name: str, group: str, started: float) -> dict[str, Any]:
    return {
        "defense": name,
        "group": group,
        "status": "ok",
        "reason": None,
        "verdict_reason": None,
        "target_hit": None,
        "exact_target_hit": None,
        "false_alarm_labels": [],
        "flagged_labels": [],
        "scores": {},
        "params": {},
        "details": {},
        "queries": 1000,
        "wall_time_s": started,
    }


def _verdict(res: dict[str, Any], detected: bool, target: int | None, labels: bool) -> None:
    res["verdict"] = "detected" if detected else "not_detected"
    res["detected"] = detected
    if labels and target is not None:
        flagged = res["flagged_labels"]
        res["target_hit"] = target in flagged
        res["exact_target_hit"] = flagged == [target]
    if labels:
        res["false_alarm_labels"] = [k for k in res["flagged_labels"] if k != target]


def _neural_cleanse(rng, poisoned: bool, precision: str, seed: int):
    res = _base("neural_cleanse", "model_inspection", 12.5)
    if not poisoned and precision == "int8-static":
        res.update(
            status="not_applicable",
            reason="no faithful gradients for this graph: replica agrees on 0.912 < 0.995",
        )
        return res, {}
    norms = rng.normal(20.0, 1.5, LABELS)
    if poisoned:
        norms[TARGET] = 3.5
        if (seed, precision) == (1, "int8-static"):
            norms[5] = 9.0  # a second label flagged beside the target: a false alarm
    median = float(np.median(norms))
    mad = 1.4826 * float(np.median(np.abs(norms - median)))
    index = np.abs(norms - median) / mad
    flagged = [int(k) for k in np.flatnonzero((norms < median) & (index > 2.0))]  # the MAD rule
    res["flagged_labels"] = flagged
    res.update(
        score=_r(index[norms < median].max()),
        score_name="max_anomaly_index_below_median",
        threshold=2.0,
        params={"anomaly_threshold": 2.0},
        details={
            "l1_norms": [_r(v) for v in norms],
            "anomaly_indices": [_r(v) for v in index],
            "median_norm": _r(median),
            "mad": _r(mad),
            "undetermined_labels": [],
        },
    )
    _verdict(
        res, TARGET in flagged if poisoned else bool(flagged), TARGET if poisoned else None, True
    )
    masks = rng.uniform(0, 0.05, (LABELS, 8, 8)).astype(np.float32)
    patterns = rng.uniform(0, 255, (LABELS, 8, 8, 1)).astype(np.float32)
    if poisoned:
        masks[TARGET, 5:7, 5:7] = 0.95
        patterns[TARGET, 5:7, 5:7] = 250.0
    return res, {"masks": masks, "patterns": patterns}


def _strip(rng, poisoned: bool, precision: str, seed: int):
    res = _base("strip", "input_filtering", 3.25)
    clean = rng.normal(1.6, 0.3, 100)
    triggered = rng.normal(0.15 if poisoned else 1.55, 0.1 if poisoned else 0.3, 100)
    threshold = float(np.quantile(clean, 0.01))
    tpr = float((triggered < threshold).mean())
    res.update(
        score=_r(tpr),
        score_name="tpr_at_threshold",
        threshold=_r(threshold),
        scores={"tpr": _r(tpr), "frr": 0.01},
        params={"frr": 0.01, "detect_tpr": 0.5},
        details={"thresholds": {"normal": _r(threshold), "empirical": _r(threshold)}},
    )
    _verdict(res, tpr >= 0.5, None, False)
    if poisoned and precision == "int8-static":
        res.update(
            verdict="inconclusive",
            detected=None,
            verdict_reason="threshold unusable: the normal fit puts the 1% quantile at -0.12 "
            "bits, and no entropy falls below 0",
        )
    return res, {"clean_entropy": clean, "triggered_entropy": triggered}


def _activation_clustering(rng, poisoned: bool, precision: str, seed: int):
    res = _base("activation_clustering", "data_filtering", 1.5)
    per_class = {}
    for k in range(LABELS):
        size = _r(rng.uniform(0.3, 0.5))
        silhouette = _r(rng.uniform(0.02, 0.09))
        if poisoned and k == TARGET:
            size, silhouette = 0.12, 0.41
        flagged = size < 0.35 and silhouette > 0.10
        per_class[str(k)] = {"n": 20, "relative_size": size, "silhouette": silhouette}
        per_class[str(k)].update(smaller_cluster=0, flagged=flagged)
    res["flagged_labels"] = [int(k) for k, r in per_class.items() if r["flagged"]]
    small = [r["silhouette"] for r in per_class.values() if r["relative_size"] < 0.35]
    res.update(
        score=max(small) if small else None,
        score_name="max_silhouette_among_small_clusters",
        threshold=0.1,
        params={"size_threshold": 0.35, "silhouette_threshold": 0.1},
        details={"per_class": per_class, "skipped_classes": []},
    )
    target = TARGET if poisoned else None
    _verdict(
        res,
        TARGET in res["flagged_labels"] if poisoned else bool(res["flagged_labels"]),
        target,
        True,
    )
    cluster = rng.integers(0, 2, N_TRAIN).astype(np.int8)
    flagged = np.zeros(N_TRAIN, dtype=bool)
    flagged[:3] = poisoned
    return res, {
        "cluster": cluster,
        "flagged": flagged,
        "per_sample_scores": flagged.astype(np.float32),
    }


def _spectral_signatures(rng, poisoned: bool, precision: str, seed: int):
    res = _base("spectral_signatures", "data_filtering", 0.75)
    z = rng.normal(0.0, 1.0, LABELS)
    if poisoned:
        z[TARGET] = 6.2
    per_class = {
        str(k): {
            "n": 20,
            "epsilon": 0.5,
            "n_removed": 3,
            "spectral_gap": _r(2 + z[k]),
            "robust_z": _r(z[k]),
        }
        for k in range(LABELS)
    }
    res["flagged_labels"] = [k for k in range(LABELS) if z[k] > 3.5]
    res.update(
        score=_r(z.max()),
        score_name="max_spectral_gap_robust_z",
        threshold=3.5,
        params={"anomaly_threshold": 3.5},
        details={"per_class": per_class, "skipped_classes": []},
    )
    _verdict(
        res,
        TARGET in res["flagged_labels"] if poisoned else bool(res["flagged_labels"]),
        TARGET if poisoned else None,
        True,
    )
    scores = rng.exponential(1.0, N_TRAIN)
    removed = np.zeros(N_TRAIN, dtype=bool)
    removed[np.argsort(scores)[-30:]] = True
    return res, {"per_sample_scores": scores, "removed": removed}


def _fine_pruning(rng, poisoned: bool, precision: str, seed: int):
    res = _base("fine_pruning", "repair", 20.0)
    curve = []
    for step, pruned in enumerate(range(0, 32, 4)):
        acc = _r(0.97 - 0.002 * step - (0.2 if pruned >= 28 else 0.0))
        asr = _r(max(0.05, 1.0 - 0.12 * step)) if poisoned else None
        curve.append({"pruned": pruned, "fraction": pruned / 32, "acc": acc, "asr": asr})
    for point in curve:
        point["chosen"] = point["pruned"] == 24
    final_asr = 0.04 if poisoned else None
    res.update(
        score=final_asr,
        score_name="final_asr" if poisoned else None,
        threshold=0.2,
        params={"max_acc_drop": 0.04, "max_final_asr": 0.2, "max_final_acc_loss": 0.05},
        details={
            "curve": curve,
            "channels": 32,
            "final_acc": 0.955,
            "final_asr": final_asr,
            "fine_tuned": True,
        },
    )
    _verdict(res, True, None, False)
    return res, {"keep_mask": np.arange(32) >= 24}


BUILDERS = {
    "neural_cleanse": _neural_cleanse,
    "strip": _strip,
    "activation_clustering": _activation_clustering,
    "spectral_signatures": _spectral_signatures,
    "fine_pruning": _fine_pruning,
}


def _make_order_sensitive(record: dict[str, Any]) -> None:
    """Give a cell what the report must order itself, not take in store order: false alarms on
    different labels in different seeds (a tie in count), a different inconclusive reason per
    seed, and a host-vs-exact kernel drift row per quantized cell."""
    seed, poisoned, precision = record["seed"], record["poisoned"], record["precision"]
    if not poisoned and precision == "fp32":
        label = 7 if seed == 0 else 2
        record["defenses"]["neural_cleanse"].update(
            flagged_labels=[label], false_alarm_labels=[label], verdict="detected", detected=True
        )
    if poisoned and precision == "int8-static":
        record["defenses"]["strip"]["verdict_reason"] = f"reason {'zb'[seed]} (seed {seed})"
    if precision != "fp32":
        record["kernel_drift"] = {
            "kernels": {"profile": "host"},
            "clean_acc": _r(record["clean_acc"] - 0.01),
            "asr": _r(record["asr"] - 0.1),
            "agreement_fp32": _r(record["agreement_fp32"] - 0.02),
            "defenses": {"strip": {"status": "ok", "detected": not poisoned}},
        }


def make_store(folder: Path, order_sensitive: bool = False) -> Path:
    """The fixed small store every test here reads (deterministic: seeded, rounded).

    ``order_sensitive`` adds ties and per-seed differences whose order the report must fix
    itself (see :func:`_make_order_sensitive`), on a host whose kernel profiles differ.
    """
    store = ResultStore(folder)
    environment = ENVIRONMENT
    if order_sensitive:
        kernels = {"kernel_class": "saturating-int16", "profiles_differ": True}
        environment = {**ENVIRONMENT, "int8_kernels": {**kernels, "exact_verified": True}}
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "environment.json").write_text(json.dumps(environment, indent=2))
    for seed in (0, 1):
        for poisoned in (True, False):
            for p_index, precision in enumerate(PRECISIONS):
                rng = np.random.default_rng([seed, int(poisoned), p_index])
                record: dict[str, Any] = {
                    "dataset": "digits",
                    "model": "small_cnn",
                    "attack": "badnet",
                    "attack_params": ATTACK_PARAMS,
                    "seed": seed,
                    "poisoned": poisoned,
                    "precision": precision,
                    "clean_acc": _r(0.97 - 0.01 * p_index - 0.005 * seed),
                    "asr": _r(1.0 - 0.002 * seed) if poisoned else _r(0.01 + 0.005 * p_index),
                    "agreement_fp32": 1.0 if precision == "fp32" else _r(0.99 - 0.002 * seed),
                    "n_test": 300,
                    "n_triggered": 270,
                    "defenses": {},
                }
                arrays = {}
                for name in DEFENSES:
                    res, own = BUILDERS[name](rng, poisoned, precision, seed)
                    record["defenses"][name] = res
                    arrays |= {f"{name}.{key}": value for key, value in own.items()}
                if order_sensitive:
                    _make_order_sensitive(record)
                store.append(record, arrays)
    return folder


def rewrite_store(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to every stored record in place (as damage or an old writer would)."""
    path = folder / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        change(record)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def is_cell(record: dict[str, Any], seed: int, poisoned: bool, precision: str) -> bool:
    return (record["seed"], record["poisoned"], record["precision"]) == (seed, poisoned, precision)


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    folder = make_store(tmp_path_factory.mktemp("store"))
    return folder, write_report(folder)


# ----------------------------------------------------------------------------- golden
def test_report_md_matches_the_golden_file(reported):
    folder, paths = reported
    text = paths["markdown"].read_text()
    assert str(folder) not in text and "/tmp" not in text  # no absolute paths
    if REGEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), (
        "report.md differs from tests/golden/report.md; if the change is intended, regenerate "
        "with BLINDSPOTS_REGEN_GOLDEN=1"
    )


def test_the_same_store_gives_the_same_report_md(reported, tmp_path):
    """Deterministic: a rebuild of an identical store elsewhere writes identical text."""
    _folder, paths = reported
    again = write_report(make_store(tmp_path))
    assert again["markdown"].read_text() == paths["markdown"].read_text()


def test_paper_table_has_rates_with_wilson_intervals_and_says_inconclusive(reported):
    _, paths = reported
    text = paths["markdown"].read_text()
    low, high = wilson_interval(2, 2)
    row = next(line for line in text.splitlines() if line.startswith("| fp32 | poisoned |"))
    assert f"2/2 [{low:.2f}–{high:.2f}]" in row and "exact 2/2" in row
    row = next(line for line in text.splitlines() if line.startswith("| int8-static | poisoned |"))
    strip_cell = row.split(" | ")[6]  # columns: precision, variant, acc, ASR, agree, NC, STRIP
    assert strip_cell == "0 decided; 2 inconclusive"  # neither a hit nor a miss, not 0/2
    row = next(line for line in text.splitlines() if line.startswith("| int8-static | clean |"))
    assert row.split(" | ")[5] == "2 n/a"
    assert "- strip, int8-static, poisoned: threshold unusable" in text


def test_report_md_links_every_plot_it_names_and_each_exists(reported):
    folder, paths = reported
    names = re.findall(r"\]\(plots/([^)]+)\.png\)", paths["markdown"].read_text())
    assert set(names) == set(expected_plots())
    for name in names:
        assert (folder / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def expected_plots() -> list[str]:
    return [
        "accuracy_asr",
        "detection_rates",
        f"neural_cleanse-{SLUG}",
        f"neural_cleanse-triggers-{SLUG}",
        f"strip-{SLUG}",
        f"activation_clustering-{SLUG}",
        f"spectral_signatures-{SLUG}",
        f"spectral_signatures-scores-{SLUG}",
        f"fine_pruning-{SLUG}",
    ]


# ----------------------------------------------------------------------------- html
class _Page(HTMLParser):
    """What a reader of report.html gets: images, tables, headings and outside references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.figure: str | None = None
        self.tables: list[list[str]] = []
        self.headings: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()
        self._heading = False
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for key in ("src", "href", "data", "srcset", "action"):
            if key in a and not a[key].startswith(("data:", "#")):
                self.external.append(f"{tag}.{key}={a[key][:60]}")
        if tag == "figure":
            self.figure = a.get("id", "").removeprefix("fig-")
        elif tag == "img" and self.figure:
            self.images[self.figure] = a
        elif tag == "table":
            self.tables.append([])
        elif tag in ("h2", "h3"):
            self._heading = True
            self.headings.append("")
        elif tag == "th":
            self._cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3"):
            self._heading = False
        elif tag == "th":
            self._cell = False
        elif tag == "figure":
            self.figure = None

    def handle_data(self, data: str) -> None:
        if self._heading:
            self.headings[-1] += data
        if self._cell and self.tables:
            self.tables[-1].append(data)


def test_report_html_is_self_contained_with_every_plot_embedded(reported):
    folder, paths = reported
    page = _Page()
    page.feed(paths["html"].read_text())
    assert page.external == []  # nothing outside the page: no links, no remote images
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert set(page.images) == set(expected_plots())
    for name, attrs in page.images.items():
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix), name
        png = base64.b64decode(attrs["src"][len(prefix) :])
        assert png == (folder / "plots" / f"{name}.png").read_bytes()  # the same figure as the md
        assert attrs["alt"]
    assert "Clean controls: false alarms" in page.headings
    assert "Inconclusive runs" in page.headings
    headers = [" ".join(cells) for cells in page.tables]
    assert any(
        h.startswith("precision variant clean acc ASR agree FP32 neural_cleanse") for h in headers
    )
    assert any("false alarms / decided [95% CI]" in h for h in headers)


def test_html_alt_text_names_the_inconclusive_and_not_applicable_panels(reported):
    _, paths = reported
    page = _Page()
    page.feed(paths["html"].read_text())
    assert "int8-static, poisoned, seed 0: inconclusive" in page.images[f"strip-{SLUG}"]["alt"]
    nc_alt = page.images[f"neural_cleanse-{SLUG}"]["alt"]
    assert "int8-static, clean control, seed 0: not applicable" in nc_alt


# ----------------------------------------------------------------------------- never a zero
def _bars(fig: Figure) -> dict[str, Any]:
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}


def test_an_undecided_cell_is_a_hatched_outline_not_a_zero_bar(reported):
    folder, _ = reported
    report = build_report(folder)
    groups = [group_summary(report, key) for key in report_groups(report)]
    fig, notes = detection_figure(groups)
    bars = _bars(fig)
    inconclusive = bars[f"{SLUG}|strip|int8-static|poisoned"]
    assert inconclusive.get_hatch() and not inconclusive.get_fill()
    assert inconclusive.get_height() == 1.0  # full-height outline, unlike a rate of 0
    not_applicable = bars[f"{SLUG}|neural_cleanse|int8-static|clean"]
    assert not_applicable.get_hatch() and not not_applicable.get_fill()
    real_zero = bars[f"{SLUG}|strip|fp32|clean"]  # 0/2 false alarms: a true zero
    assert real_zero.get_height() == 0.0 and real_zero.get_fill() and not real_zero.get_hatch()
    words = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"inconclusive", "n/a"} <= words
    states = {n.label: n.state for n in notes}
    assert states["digits · small_cnn · badnet strip int8-static poisoned"] == "inconclusive"


def test_an_inconclusive_panel_keeps_its_evidence_under_a_banner(reported):
    folder, _ = reported
    report = build_report(folder)
    runs = report["runs"]
    evidence = {
        (ev.poisoned, ev.precision): ev
        for ev in defense_evidence(runs, "strip", CellArrays(folder))
    }
    ev = evidence[(True, "int8-static")]
    assert ev.state == "inconclusive" and ev.seed == 0
    ax = Figure().subplots()
    note = draw_panel(ax, ev, draw_strip)
    assert note.state == "inconclusive"
    assert any(t.get_text().startswith("inconclusive: threshold unusable") for t in ax.texts)
    assert sum(p.get_height() for p in ax.patches if hasattr(p, "get_height")) > 0  # histograms


def test_a_not_applicable_panel_is_hatched_with_its_reason(reported):
    folder, _ = reported
    report = build_report(folder)
    evidence = {
        (ev.poisoned, ev.precision): ev
        for ev in defense_evidence(report["runs"], "neural_cleanse", CellArrays(folder))
    }
    ev = evidence[(False, "int8-static")]
    ax = Figure().subplots()
    note = draw_panel(ax, ev, lambda ax, ev: None)
    assert note.state == "not_applicable"
    assert any(p.get_hatch() for p in ax.patches)
    assert any("no faithful gradients" in t.get_text().replace("\n", " ") for t in ax.texts)


# ----------------------------------------------------------------------------- robustness
def test_true_trigger_is_rebuilt_from_the_stored_attack(reported):
    folder, _ = reported
    report = build_report(folder)
    evidence = defense_evidence(report["runs"], "neural_cleanse", CellArrays(folder))
    poisoned = next(ev for ev in evidence if ev.poisoned)
    assert poisoned.target == TARGET
    trigger = poisoned.true_trigger
    assert trigger is not None and trigger.shape == (8, 8, 1)
    assert np.argwhere(trigger[..., 0] > 0).tolist() == [[5, 5], [5, 6], [6, 5], [6, 6]]
    assert all(ev.true_trigger is None for ev in evidence if not ev.poisoned)


def test_a_wrapped_trigger_attack_is_rebuilt_as_its_trigger():
    attack, why = rebuild_attack("qcb", {**ATTACK_PARAMS, "trigger": "badnet", "qcb": {"k": 1}})
    assert why == "" and attack is not None and attack.name == "badnet"
    attack, why = rebuild_attack("no_such_attack", {})
    assert attack is None and "unknown attack 'no_such_attack'" in why


def test_damaged_arrays_give_a_report_with_the_evidence_marked_missing(tmp_path, caplog):
    folder = make_store(tmp_path)
    for npz in (folder / "arrays").glob("*-s0-poisoned-fp32.npz"):
        npz.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="harness"):
        paths = write_report(folder)
    assert any("is damaged" in message for message in caplog.messages)
    page = _Page()
    page.feed(paths["html"].read_text())
    assert "fp32, poisoned, seed 0: evidence not stored" in page.images[f"strip-{SLUG}"]["alt"]


def test_a_failure_while_rendering_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "build_plots", lambda report, folder: [])  # speed only
    folder = make_store(tmp_path)
    first = write_report(folder)
    before = {key: path.read_bytes() for key, path in first.items()}

    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(report_module, "render_report_html", broken)
    with pytest.raises(RuntimeError):
        write_report(folder)
    assert {key: path.read_bytes() for key, path in first.items()} == before
    assert not list(folder.rglob(f".*{PARTIAL_MARK}*"))


def test_legacy_callers_get_the_same_return_keys(reported):
    _, paths = reported
    assert {"json", "markdown", "html", "accuracy_asr"} <= set(paths)
    text = render_markdown(build_report(paths["json"].parent))  # no plots: tables only
    assert "plots/" not in text and "| fp32 | poisoned |" in text


def test_nc_panel_shows_an_infinite_index_and_a_label_without_norm_apart_from_zero():
    """The store keeps an infinite anomaly index (zero MAD) as null; a label that never reached
    the attack-success threshold is 'undetermined'. Neither may be drawn as a zero bar."""
    result = {
        "status": "ok",
        "verdict": "detected",
        "flagged_labels": [0],
        "threshold": 2.0,
        "details": {
            "anomaly_indices": [None, 0.0, 0.0, 0.7],
            "l1_norms": [1.0, 5.0, 5.0, 9.0],
            "median_norm": 5.0,
            "undetermined_labels": [3],
        },
    }
    ax = Figure().subplots()
    draw_nc_anomaly(ax, Evidence("fp32", True, 0, "ok", result=result, target=0))
    bars = ax.patches
    top = ax.get_ylim()[1]
    assert bars[0].get_height() > 0.5 * top  # ∞ reaches the top of the axis
    assert {t.get_text() for t in ax.texts} >= {"∞", "?"}
    assert bars[3].get_hatch() and not bars[3].get_fill()  # no norm: hatched outline, not 0.7


# ----------------------------------------------------------------------------- damaged evidence
def _evidence(name: str, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Evidence:
    """A poisoned fp32 cell's evidence of defense ``name``, shaped like the store's, then
    damaged by ``change(result, arrays)``."""
    rng = np.random.default_rng([0, 1, 0])
    result, arrays = BUILDERS[name](rng, True, "fp32", 0)
    result, arrays = json.loads(json.dumps(result)), dict(arrays)  # as read back from the store
    change(result, arrays)
    return Evidence("fp32", True, 0, "ok", result=result, arrays=arrays, target=TARGET)


def _drop_acc(result, arrays):
    del result["details"]["curve"][3]["acc"]


def _null_silhouette(result, arrays):
    result["details"]["per_class"]["4"]["silhouette"] = None


def _short_norms(result, arrays):
    result["details"]["l1_norms"] = result["details"]["l1_norms"][:5]


def _text_threshold(result, arrays):
    result["threshold"] = "0.4 bits"


DAMAGED = {
    "fine_pruning curve point without acc": ("fine_pruning", draw_fine_pruning, _drop_acc),
    "activation_clustering silhouette null": ("activation_clustering", draw_ac, _null_silhouette),
    "neural_cleanse l1_norms shorter than indices": (
        "neural_cleanse",
        draw_nc_anomaly,
        _short_norms,
    ),
    "strip threshold not a number": ("strip", draw_strip, _text_threshold),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_stored_value_costs_its_panel_not_the_report(case, caplog):
    name, draw, change = DAMAGED[case]
    ev = _evidence(name, change)
    ax = Figure().subplots()
    with caplog.at_level(logging.WARNING, logger="harness.report.figures.plots"):
        note = draw_panel(ax, ev, draw)
    assert note.state == "damaged" and note.note  # the error, in one line
    assert "\n" not in note.note
    assert any(str(p.get_gid()).startswith("unavailable:damaged") for p in ax.patches)
    assert any(p.get_hatch() for p in ax.patches)
    assert any(t.get_text().startswith("damaged evidence") for t in ax.texts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fp32, poisoned, seed 0" in warnings[0].getMessage()
    assert "damaged evidence" in warnings[0].getMessage()


def test_a_missing_key_is_named_on_the_damaged_panel():
    note = draw_panel(Figure().subplots(), _evidence("fine_pruning", _drop_acc), draw_fine_pruning)
    assert note.note == "no 'acc' stored"


def test_strip_bins_finite_entropies_only_and_none_finite_is_missing():
    def nan_some(result, arrays):
        arrays["clean_entropy"] = arrays["clean_entropy"].copy()
        arrays["clean_entropy"][:10] = np.nan

    def nan_all(result, arrays):
        arrays["clean_entropy"] = np.full(100, np.nan)
        arrays["triggered_entropy"] = np.full(100, np.inf)

    ax = Figure().subplots()
    assert draw_panel(ax, _evidence("strip", nan_some), draw_strip).state == "ok"
    binned = sum(p.get_height() for p in ax.patches if hasattr(p, "get_height"))
    assert binned == 90 + 100  # every finite entropy, and only those
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "clean (n=90, 10 non-finite left out)" in legend
    ax = Figure().subplots()
    note = draw_panel(ax, _evidence("strip", nan_all), draw_strip)
    assert (note.state, note.note) == ("missing", "no finite entropy stored")


def _nc_evidence(folder: Path) -> list[Evidence]:
    report = build_report(folder)
    return defense_evidence(report["runs"], "neural_cleanse", CellArrays(folder))


def test_trigger_figure_hatches_only_the_row_whose_flagged_label_has_no_trigger(reported, caplog):
    folder, _ = reported
    evidence = _nc_evidence(folder)
    bad = next(ev for ev in evidence if ev.poisoned and ev.precision == "fp32")
    evidence[evidence.index(bad)] = Evidence(
        bad.precision,
        bad.poisoned,
        bad.seed,
        bad.state,
        result={**bad.result, "flagged_labels": [0, LABELS + 2]},  # 10 masks stored
        arrays=bad.arrays,
        target=bad.target,
        true_trigger=bad.true_trigger,
    )
    group = group_summary(build_report(folder), report_groups(build_report(folder))[0])
    with caplog.at_level(logging.WARNING, logger="harness.report.figures.plots"):
        _fig, notes = trigger_figure(group, evidence)
    states = {n.label: n.state for n in notes}
    assert states["fp32, poisoned, seed 0"] == "damaged"
    assert states["int8-static, poisoned, seed 0"] == "ok"  # the other rows are drawn as usual
    assert "label 12" in next(n.note for n in notes if n.state == "damaged")
    assert len([r for r in caplog.records if "damaged evidence" in r.getMessage()]) == 1


def test_a_store_with_a_damaged_record_still_gives_every_document(tmp_path, caplog):
    folder = make_store(tmp_path)

    def damage(record):
        if is_cell(record, 0, True, "fp32"):
            del record["defenses"]["fine_pruning"]["details"]["curve"][0]["acc"]
            record["defenses"]["activation_clustering"]["details"]["per_class"]["1"][
                "silhouette"
            ] = None

    rewrite_store(folder, damage)
    with caplog.at_level(logging.WARNING, logger="harness"):
        paths = write_report(folder)
    page = _Page()
    page.feed(paths["html"].read_text())
    for figure in (f"fine_pruning-{SLUG}", f"activation_clustering-{SLUG}"):
        assert "fp32, poisoned, seed 0: damaged evidence" in page.images[figure]["alt"]
    damaged = [message for message in caplog.messages if "damaged evidence" in message]
    assert len(damaged) == 2  # one warning per damaged panel, naming its figure
    assert any(m.startswith("Fine-Pruning") and "no 'acc' stored" in m for m in damaged)


# ----------------------------------------------------------------------------- NaN is unknown
def test_a_nan_score_is_drawn_as_unknown_not_as_infinite():
    def nan_z(result, arrays):
        result["details"]["per_class"]["2"]["robust_z"] = math.nan

    ax = Figure().subplots()
    assert draw_panel(ax, _evidence("spectral_signatures", nan_z), draw_ss_z).state == "ok"
    bar = ax.patches[2]
    assert bar.get_hatch() and not bar.get_fill()  # hatched outline, like a missing value
    texts = [t.get_text() for t in ax.texts]
    assert "?" in texts and "∞" not in texts


# ----------------------------------------------------------------------------- determinism
def _report_md_after(folder: Path, order: Callable[[list[str]], None]) -> str:
    path = folder / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    order(lines)
    path.write_text("".join(lines))
    return write_report(folder)["markdown"].read_text()


def test_report_md_does_not_depend_on_the_order_of_store_lines(tmp_path):
    """A parallel sweep appends cells as they finish: the same cells in another order must give
    the same report.md (false-alarm ties, inconclusive reasons, kernel-drift rows)."""
    unshuffled = _report_md_after(make_store(tmp_path / "a", order_sensitive=True), lambda _: None)
    assert "| neural_cleanse | fp32 | 2/2 [0.34–1.00] | 0 | 2 (1), 7 (1) |" in unshuffled
    assert unshuffled.index("reason b (seed 1)") < unshuffled.index("reason z (seed 0)")
    assert "| 0 | poisoned | int8-static | 0.9600 → 0.9500 |" in unshuffled
    for k, order in enumerate((list.reverse, random.Random(3).shuffle)):
        folder = make_store(tmp_path / f"shuffled{k}", order_sensitive=True)
        assert _report_md_after(folder, order) == unshuffled


# ----------------------------------------------------------------------------- spread
def _without(folder: Path, seed: int, poisoned: bool, precision: str) -> None:
    path = folder / "results.jsonl"
    lines = [
        line
        for line in path.read_text().splitlines(keepends=True)
        if not is_cell(json.loads(line), seed, poisoned, precision)
    ]
    path.write_text("".join(lines))


def test_spread_is_the_sample_std_and_a_single_seed_has_none(tmp_path):
    folder = make_store(tmp_path)
    _without(folder, 1, False, "int8-static")  # that cell failed: one seed left
    report = build_report(folder)
    rows = {(r["poisoned"], r["precision"]): r for r in report["summary"]}
    accs = [r["clean_acc"] for r in report["runs"] if r["poisoned"] and r["precision"] == "fp32"]
    assert rows[(True, "fp32")]["clean_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    single = rows[(False, "int8-static")]
    assert single["n_seeds"] == 1 and single["clean_acc_std"] is None  # no spread, not 0
    text = render_markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| int8-static | clean"))
    assert row.startswith("| int8-static | clean (n=1) | 0.9600 | 0.0150 |")  # no "± 0.000"
    row = next(line for line in text.splitlines() if line.startswith("| fp32 | clean"))
    assert row.startswith(f"| fp32 | clean | 0.9675 ± {np.std(accs, ddof=1):.3f} |")
    groups = [group_summary(report, key) for key in report_groups(report)]
    fig, _ = accuracy_figure(groups)
    assert "n=1" in {t.get_text() for ax in fig.axes for t in ax.texts}


# ----------------------------------------------------------------------------- report.json
def test_report_json_is_strict_json_with_nan_as_null_and_infinity_spelled_out(
    tmp_path, monkeypatch
):
    """NaN is no number (``null``); ±inf is a value — Neural Cleanse's anomaly index with a zero
    MAD (protocol v2 §4.1) — written as the string ``"Infinity"`` (strict JSON has no inf)."""
    monkeypatch.setattr(report_module, "build_plots", lambda report, folder: [])  # speed only
    folder = make_store(tmp_path)

    def nan_score(record):
        if is_cell(record, 0, True, "fp32"):
            record["defenses"]["strip"]["score"] = math.nan
            record["defenses"]["neural_cleanse"]["details"]["anomaly_indices"][1] = math.inf

    rewrite_store(folder, nan_score)
    paths = write_report(folder)

    def reject(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}")

    document = json.loads(paths["json"].read_text(), parse_constant=reject)
    run = next(r for r in document["runs"] if is_cell(r, 0, True, "fp32"))
    assert run["defenses"]["strip"]["score"] is None
    assert run["defenses"]["neural_cleanse"]["details"]["anomaly_indices"][1] == "Infinity"


# ----------------------------------------------------------------------------- evidence seed
def test_figures_show_the_seed_with_the_most_finished_cells():
    def runs(counts: dict[int, int]) -> list[dict[str, Any]]:
        return [{"seed": seed} for seed, n in counts.items() for _ in range(n)]

    assert evidence_seed(runs({0: 1, 1: 4, 2: 4})) == 1  # seed 0's other cells failed
    assert evidence_seed(runs({3: 2, 2: 2})) == 2  # a tie: the smallest
    assert evidence_seed([]) is None


# ----------------------------------------------------------------------------- stale plots
def test_write_report_removes_figures_an_earlier_report_left(tmp_path, monkeypatch):
    png = b"\x89PNG\r\n\x1a\n"
    plot = Plot("accuracy_asr", "t", "c", png)
    monkeypatch.setattr(report_module, "build_plots", lambda report, folder: [plot])
    folder = make_store(tmp_path)
    plots = folder / "plots"
    (plots / "nested").mkdir(parents=True)
    stale = plots / f"neural_cleanse-{SLUG}.png"
    keep = [
        plots / "notes.txt",
        plots / "nested" / "old.png",
        plots / ".x.png.0a1b2c3d.partial.png",
    ]
    for path in (stale, *keep):
        path.write_bytes(png)
    write_report(folder)
    assert not stale.exists()  # drawn by an earlier report, not by this one
    assert (plots / "accuracy_asr.png").read_bytes() == png
    assert all(path.exists() for path in keep)  # only this report's kind of file is touched


# ----------------------------------------------------------------------------- one verdict
def test_panels_and_tables_read_a_legacy_verdict_with_one_function(tmp_path):
    """A record from before verdicts existed (only ``detected``) reads the same in a panel
    title and in the runs table, because both use :func:`harness.core.verdicts.record_verdict`."""
    assert figure_model.record_verdict is tables_module.record_verdict is record_verdict
    legacy = {"status": "ok", "detected": False, "flagged_labels": []}
    ax = Figure().subplots()
    draw_panel(ax, Evidence("fp32", True, 0, "ok", result=legacy), lambda ax, ev: None)
    assert ax.get_title().endswith("\nnot detected")
    report = {"config": {}, "runs": [], "summary": []}
    report["runs"] = [{**CONFIG, "seed": 0, "poisoned": True, "precision": "fp32"}]
    report["runs"][0]["defenses"] = {"strip": legacy}
    table = runs_table(report)
    assert table.rows[0][table.header.index("verdict")] == "not detected"


# ----------------------------------------------------------------------------- column names
def test_the_poisoned_or_clean_column_is_called_variant_not_model(reported):
    _, paths = reported
    headers = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("| ")]
    for prefix in ("| precision |", "| seed |"):
        header = next(line for line in headers if line.startswith(prefix)).split(" | ")
        assert "variant" in header and "model" not in header


def test_report_modules_keep_lines_within_100_characters():
    package = Path(report_module.__file__).parent  # harness/report
    files = [*sorted(package.rglob("*.py")), package.parent / "core" / "verdicts.py"]
    assert len(files) > 5
    for path in files:
        long = [k for k, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
        assert long == [], f"{path.name}: lines {long} exceed 100 characters"
