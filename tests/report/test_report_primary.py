"""The report's "Primary metrics (protocol v1)" section on small synthetic stores.

The store is built by hand (no training): seeds 0–6 × poisoned/clean × fp32/int8-static, with
Neural Cleanse detecting the target at FP32 on every valid poisoned model and never at
int8-static, Spectral Signatures unchanged, seed 6's attack below the §2 validity bar, one
inconclusive clean cell, AC without a small cluster, STRIP's input AUROC, Fine-Pruning's
no-fine-tune control and NC's onnxruntime confirmation rates. Every expected number is worked out
in the test, not read back from the code.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import harness.report.document as report_module
from harness.core.metrics import wilson_interval
from harness.pipeline.runner import git_provenance
from harness.pipeline.store import ResultStore
from harness.report.data import build_report, report_groups
from harness.report.document import write_report
from harness.report.primary import model_score, primary_metrics
from harness.report.render import render_markdown
from harness.report.schema import ReportDocument
from harness.report.stats import bootstrap_auroc_ci

PRECISIONS = ["fp32", "int8-static"]
SEEDS = list(range(7))
INVALID = 6  # its poisoned model's FP32 ASR is 0.5
TARGET = 0
DEFENSES = [
    "neural_cleanse",
    "activation_clustering",
    "spectral_signatures",
    "strip",
    "fine_pruning",
]
CONFIG = {"dataset": "digits", "model": "small_cnn", "attack": "badnet", "seeds": SEEDS,
          "precisions": PRECISIONS, "defenses": DEFENSES}  # fmt: skip


def _res(name: str, group: str, verdict: str, **extra: Any) -> dict[str, Any]:
    res = {"defense": name, "group": group, "status": "ok", "verdict": verdict,
           "detected": {"detected": True, "not_detected": False}.get(verdict)}  # fmt: skip
    res.update(extra)
    return res


def _nc(seed: int, poisoned: bool, precision: str) -> dict[str, Any]:
    detected = poisoned and precision == "fp32"
    flagged = [TARGET] if detected else []
    unconfirmed = []
    if poisoned and precision == "int8-static" and seed == 0:
        flagged_before = [TARGET]  # flagged, but its trigger fails on the deployed session
        unconfirmed = [TARGET]
    else:
        flagged_before = flagged
    rates = [None] * 10
    rates[TARGET] = 0.97 if detected else 0.40
    verdict = "detected" if detected else "not_detected"
    extra: dict[str, Any] = {}
    if not poisoned and precision == "int8-static" and seed == 3:
        verdict = "inconclusive"
        extra["verdict_reason"] = "labels [4] never reached the attack-success threshold"
    return _res(
        "neural_cleanse",
        "model_inspection",
        verdict,
        flagged_labels=flagged,
        score=(3.0 + seed) if poisoned else 0.5 + 0.1 * seed,  # perfect separation
        score_name="max_anomaly_index_below_median",
        details={"profile": "paper", "custom_step": False, "ort_confirm_threshold": 0.9,
                 "flagged_before_confirmation": flagged_before, "unconfirmed_labels": unconfirmed,
                 "ort_attack_success": rates},
        **extra,
    )  # fmt: skip


def _ss(seed: int, poisoned: bool, precision: str) -> dict[str, Any]:
    details: dict[str, Any] = {"removed_fraction": 0.95, "epsilon_source": "poison_budget"}
    if poisoned:
        details |= {"filtering": {"poison_recall": 0.99},
                    "target_class": {"poison_fraction_of_class": 0.95}}  # fmt: skip
    return _res("spectral_signatures", "data_filtering", "not_detected", flagged_labels=[],
                score=1.0, score_name="max_spectral_gap_robust_z", details=details)  # fmt: skip


def _ac(seed: int, poisoned: bool, precision: str) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if poisoned:
        details["target_class"] = {"poison_fraction_of_class": 0.95,
                                   "smaller_cluster_poison_fraction": 0.10,
                                   "smaller_cluster_poison_recall": 0.05}  # fmt: skip
    # no class below the size threshold on clean controls: no score, the protocol's −1
    score = 0.2 if poisoned else None
    return _res("activation_clustering", "data_filtering", "not_detected", flagged_labels=[],
                score=score, score_name="max_silhouette_among_small_clusters",
                details=details)  # fmt: skip


def _strip(seed: int, poisoned: bool, precision: str) -> dict[str, Any]:
    tpr = 0.8 if poisoned else 0.02
    return _res("strip", "input_filtering", "detected" if poisoned else "not_detected",
                score=tpr, score_name="tpr_at_threshold",
                params={"blend": "add_float", "threshold_fit": "normal"},
                scores={"auroc": 0.99 if poisoned else 0.5, "tpr": tpr, "frr": 0.01,
                        "tpr_empirical_threshold": tpr + 0.01 * seed,
                        "frr_empirical_threshold": 0.02})  # fmt: skip


def _fp(seed: int, poisoned: bool, precision: str) -> dict[str, Any]:
    control = {"acc": 0.9, "asr": 0.9 if poisoned else None, "acc_loss": 0.01,
               "success": not poisoned}  # fmt: skip
    return _res("fine_pruning", "repair", "detected", score=0.05 if poisoned else None,
                score_name="final_asr" if poisoned else None,
                details={"control_no_fine_tune": control, "fine_tune_data": "held_out"})  # fmt: skip


BUILDERS = {"neural_cleanse": _nc, "activation_clustering": _ac, "spectral_signatures": _ss,
            "strip": _strip, "fine_pruning": _fp}  # fmt: skip


def make_records(seeds: list[int] = SEEDS) -> list[dict[str, Any]]:
    records = []
    for seed in seeds:
        for poisoned in (True, False):
            for precision in PRECISIONS:
                asr = (0.5 if seed == INVALID else 0.99) if poisoned else 0.01
                records.append(
                    {"dataset": "digits", "model": "small_cnn", "attack": "badnet", "seed": seed,
                     "poisoned": poisoned, "precision": precision, "clean_acc": 0.97, "asr": asr,
                     "agreement_fp32": 1.0,
                     "defenses": {n: BUILDERS[n](seed, poisoned, precision) for n in DEFENSES}}
                )  # fmt: skip
    return records


def metrics_of(records: list[dict[str, Any]], environment: dict[str, Any] | None = None):
    report = {"config": CONFIG, "environment": environment or {}, "runs": records, "summary": []}
    return primary_metrics(report, report_groups(report))


def entry(group: dict[str, Any], defense: str, precision: str) -> dict[str, Any]:
    return next(
        e for e in group["defenses"] if (e["defense"], e["precision"]) == (defense, precision)
    )


@pytest.fixture(scope="module")
def group() -> dict[str, Any]:
    (only,) = metrics_of(make_records())["groups"]
    return only


def test_an_invalid_attack_leaves_the_poisoned_model_out_and_keeps_its_clean_control(group):
    assert group["invalid_attacks"] == [
        {"seed": INVALID, "fp32_asr": 0.5, "reason": "FP32 ASR < 0.9"}
    ]
    nc = entry(group, "neural_cleanse", "fp32")
    assert (nc["auroc"]["n_poisoned"], nc["auroc"]["n_clean"]) == (6, 7)
    assert nc["detection"]["n"] == 6 and nc["false_alarm"]["n"] == 7


def test_auroc_with_its_bootstrap_ci_and_the_protocol_claim(group):
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    # every poisoned score (3..8) above every clean one (0.5..1.1): AUROC 1, every resample too
    assert nc["value"] == 1.0 and nc["ci"] == [1.0, 1.0] and nc["ci_above_half"] is True
    ss = entry(group, "spectral_signatures", "fp32")["auroc"]
    assert ss["value"] == 0.5 and ss["ci"] == [0.5, 0.5] and ss["ci_above_half"] is False


def test_an_inconclusive_run_keeps_its_score_in_the_auroc_but_counts_in_no_rate(group):
    nc = entry(group, "neural_cleanse", "int8-static")
    assert nc["auroc"]["n_clean"] == 7  # seed 3's inconclusive clean control still scores
    assert nc["false_alarm"] == {
        "k": 0, "n": 6, "rate": 0.0, "ci": list(wilson_interval(0, 6)), "inconclusive": 1,
        "not_ok": 0,
    }  # fmt: skip


def test_detection_rate_with_wilson(group):
    nc = entry(group, "neural_cleanse", "fp32")["detection"]
    assert (nc["k"], nc["n"], nc["rate"]) == (6, 6, 1.0)
    assert nc["ci"] == pytest.approx([0.60967, 1.0], abs=1e-4)  # Wilson 6/6 by its closed form


def test_acs_missing_score_is_minus_one_and_strips_score_is_its_input_auroc(group):
    assert model_score("activation_clustering", _ac(0, False, "fp32")) == -1.0
    assert model_score("strip", _strip(0, True, "fp32")) == 0.99
    stale = {**_ss(0, True, "fp32"), "score_name": "an_older_rule"}
    assert model_score("spectral_signatures", stale) is None  # not the protocol's score
    assert entry(group, "activation_clustering", "fp32")["auroc"]["value"] == 1.0  # 0.2 > −1
    assert entry(group, "strip", "fp32")["auroc"]["value"] == 1.0
    assert entry(group, "fine_pruning", "fp32")["auroc"] is None  # a repair has no AUROC


def test_mcnemar_with_holm_decides_the_blinding_claim(group):
    """NC: FP32 detects on all 6 valid seeds, int8-static on none: p = 2·½⁶ = 0.031 alone,
    but Holm over the group's family (NC, AC, SS, STRIP, FP at int8-static: 5 tests, the
    others p = 1) multiplies it by 5: 0.156, no rejection."""
    paired = entry(group, "neural_cleanse", "int8-static")["paired_poisoned"]
    assert (paired["fp32_only"], paired["precision_only"], paired["n_pairs"]) == (6, 0, 6)
    assert paired["p"] == pytest.approx(0.03125)
    assert paired["holm_family"] == 5
    assert paired["p_holm"] == pytest.approx(5 * 0.03125)
    assert paired["reading"] == "no evidence of a change at n = 6"
    clean = entry(group, "neural_cleanse", "int8-static")["paired_clean"]
    assert (clean["n_pairs"], clean["left_out_inconclusive"], clean["p"]) == (6, 1, 1.0)
    assert entry(group, "neural_cleanse", "fp32")["paired_poisoned"] is None


def test_a_holm_rejection_is_read_as_the_protocols_claim():
    records = [r for r in make_records() if r["seed"] != INVALID]
    for record in records:  # NC alone: a family of one test
        record["defenses"] = {"neural_cleanse": record["defenses"]["neural_cleanse"]}
    (group,) = metrics_of(records)["groups"]
    paired = entry(group, "neural_cleanse", "int8-static")["paired_poisoned"]
    assert paired["p_holm"] == pytest.approx(0.03125)
    assert (
        paired["reading"] == "FP32 detects more: quantization to int8-static blinds neural_cleanse"
    )


def test_fine_prunings_removal_rates_and_its_no_fine_tune_control(group):
    repair = entry(group, "fine_pruning", "fp32")["repair"]
    assert (repair["removal"]["k"], repair["removal"]["n"]) == (6, 6)
    assert (repair["accuracy_kept"]["k"], repair["accuracy_kept"]["n"]) == (7, 7)
    assert (repair["control_removal"]["k"], repair["control_removal"]["n"]) == (0, 6)
    assert (repair["control_accuracy_kept"]["k"], repair["control_accuracy_kept"]["n"]) == (7, 7)
    assert repair["fine_tune_data"] == {"held_out": 13}


def test_nc_confirmation_rates_of_flagged_labels(group):
    rows = {(r["precision"], r["poisoned"]): r for r in group["neural_cleanse"]}
    fp32 = rows[("fp32", True)]
    assert fp32["profiles"] == {"paper": 6} and fp32["confirm_threshold"] == 0.9
    assert fp32["confirmed"] == 6 and {f["rate"] for f in fp32["flags"]} == {0.97}
    static = rows[("int8-static", True)]
    assert static["flags"] == [{"seed": 0, "label": 0, "rate": 0.40, "confirmed": False}]
    assert static["confirmed"] == 0


def test_strip_rates_at_both_thresholds(group):
    row = next(r for r in group["strip"] if (r["precision"], r["poisoned"]) == ("fp32", True))
    assert row["blends"] == {"add_float": 6} and row["runs"] == 6
    assert row["tpr_normal"] == pytest.approx(0.8) and row["frr_normal"] == pytest.approx(0.01)
    # valid seeds 0..5: 0.8 + 0.01 · mean(0..5) = 0.825
    assert row["tpr_empirical"] == pytest.approx(0.825)
    clean = next(r for r in group["strip"] if (r["precision"], r["poisoned"]) == ("fp32", False))
    assert clean["runs"] == 7  # seed 6's clean control is kept


def test_regime_columns_per_poisoned_cell(group):
    assert len(group["regime"]) == 6 * 2  # valid seeds × precisions; clean controls have none
    row = group["regime"][0]
    assert [(r["precision"], r["seed"]) for r in group["regime"][5:7]] == [
        ("fp32", 5),
        ("int8-static", 0),
    ]
    assert row == {
        "seed": 0, "precision": "fp32", "target_poison_fraction": 0.95,
        "ss_removed_fraction": 0.95, "ss_poison_recall": 0.99, "ss_epsilon_source": "poison_budget",
        "ss_flagged": [], "ac_purity": 0.10, "ac_recall": 0.05, "ac_flagged": [],
    }  # fmt: skip


def test_one_seed_says_n_too_small_instead_of_a_ci():
    (group,) = metrics_of(make_records([0]))["groups"]
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert nc["value"] == 1.0 and nc["ci"] is None and nc["note"] == "n too small"
    paired = entry(group, "neural_cleanse", "int8-static")["paired_poisoned"]
    assert (
        paired["reading"]
        == "no evidence of a change at n = 1 (fewer than 6 usable pairs cannot reject)"
    )
    text = "\n".join(
        render_markdown({"config": CONFIG, "environment": {}, "runs": make_records([0]),
                         "summary": []}).splitlines()
    )  # fmt: skip
    assert "1.00 (n too small for a CI: n = 1 + 1)" in text


# ----------------------------------------------------------------------------- the written report
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("store")
    store = ResultStore(folder)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    environment = {"blindspots": "0.1.0", "git_commit": "0123456789abcdef" * 2 + "01234567",
                   "git_dirty": False}  # fmt: skip
    (folder / "environment.json").write_text(json.dumps(environment))
    for record in make_records():
        store.append(record, {})
    with pytest.MonkeyPatch.context() as patch:  # the figures are another test's business
        patch.setattr(report_module, "build_plots", lambda report, folder: [])
        return folder, write_report(folder)


def test_report_md_and_html_carry_the_section_with_version_and_commit(written):
    _, paths = written
    for text in (paths["markdown"].read_text(), paths["html"].read_text()):
        assert "Primary metrics (protocol v1)" in text
        assert "commit <code>0123456789ab</code>" in text or "commit `0123456789ab`" in text
        assert "no evidence of a change at n = 6" in text
        assert (
            "seed 6 (FP32 ASR &lt; 0.9: 0.500)" in text or "seed 6 (FP32 ASR < 0.9: 0.500)" in text
        )
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| neural_cleanse | fp32 | 1."))
    assert row.split(" | ")[2:4] == [
        "1.00 [1.00–1.00] (n = 6 + 7); degenerate CI: every resample gives the same AUROC",
        "yes: neural_cleanse works at fp32",
    ]


def test_report_json_holds_the_metrics_under_its_schema(written):
    _, paths = written
    document = json.loads(paths["json"].read_text())
    ReportDocument.model_validate(document)
    metrics = document["primary_metrics"]
    assert metrics["protocol_version"] == 1
    assert metrics["provenance"]["git_commit"].startswith("0123456789abcdef")
    assert metrics["settings"]["bootstrap_seed"] == 20261207
    nc = next(e for e in metrics["groups"][0]["defenses"] if e["defense"] == "neural_cleanse")
    assert nc["auroc"]["ci"] == list(
        bootstrap_auroc_ci([3.0 + s for s in range(6)], [0.5 + 0.1 * s for s in range(7)])
    )


def test_a_store_without_a_commit_says_so(tmp_path):
    store = ResultStore(tmp_path)
    (tmp_path / "environment.json").write_text(json.dumps({"blindspots": "0.1.0"}))
    for record in make_records([0, 1]):
        store.append(record, {})
    text = render_markdown(build_report(tmp_path))
    assert "the commit that produced them is not recorded" in text


def test_the_runner_records_the_commit_it_runs_from():
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        pytest.skip("no git")
    if head.returncode:
        pytest.skip("not a git checkout")
    provenance = git_provenance()
    assert provenance["git_commit"] == head.stdout.strip()
    assert isinstance(provenance["git_dirty"], bool)
