"""The report built from a store alone: golden report.md, a self-contained report.html with
every evidence plot, and no undecided cell drawn as a zero.

The store is made by hand through :class:`~harness.store.ResultStore` (no training): 2 seeds ×
poisoned/clean × fp32/int8-static, with defense results shaped like the real defenses' (NC
anomaly indices and reversed triggers, STRIP entropies, AC per-class clusters, SS scores,
Fine-Pruning curves). STRIP is inconclusive on the poisoned int8-static cells and NC not
applicable on the clean int8-static cells.

Regenerate the golden file after an intended change with
``BLINDSPOTS_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_report.py -k golden``.
"""

from __future__ import annotations

import base64
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

import harness.report as report_module
from harness.atomic import PARTIAL_MARK
from harness.attacks.base import build_attack
from harness.metrics import wilson_interval
from harness.report import (
    CellArrays,
    build_report,
    defense_evidence,
    group_summary,
    rebuild_attack,
    render_markdown,
    report_groups,
    write_report,
)
from harness.report_plots import (
    Evidence,
    detection_figure,
    draw_nc_anomaly,
    draw_panel,
    draw_strip,
)
from harness.store import ResultStore

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


def make_store(folder: Path) -> Path:
    """The fixed small store every test here reads (deterministic: seeded, rounded)."""
    store = ResultStore(folder)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "environment.json").write_text(json.dumps(ENVIRONMENT, indent=2))
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
                store.append(record, arrays)
    return folder


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
    strip_cell = row.split(" | ")[6]  # columns: precision, model, acc, ASR, agree, NC, STRIP
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
        h.startswith("precision model clean acc ASR agree FP32 neural_cleanse") for h in headers
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
