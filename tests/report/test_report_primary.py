"""The report's "Primary metrics (protocol v2)" section on small synthetic stores.

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

import numpy as np
import pytest

import harness.report.document as report_module
from defenses.base import DefenseResult
from defenses.neural_cleanse import mad_anomaly_index
from harness.core.metrics import wilson_interval
from harness.pipeline.evaluate import result_fields
from harness.pipeline.runner import git_provenance
from harness.pipeline.store import ResultStore
from harness.report.data import build_report, report_groups
from harness.report.document import write_report
from harness.report.primary import model_score, primary_metrics
from harness.report.render import render_markdown
from harness.report.schema import DefenseRecord, ReportDocument, json_schema
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
        assert "Primary metrics (protocol v2)" in text
        assert "(protocol v2, commit 0123456789ab)" in text  # every table's section title
        assert "commit <code>0123456789ab</code>" in text or "commit `0123456789ab`" in text
        assert "no evidence of a change at n = 6" in text
        assert (
            "seed 6 (FP32 ASR &lt; 0.9: 0.500)" in text or "seed 6 (FP32 ASR < 0.9: 0.500)" in text
        )
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| neural_cleanse | fp32 | 1."))
    assert row.split(" | ")[2:5] == [
        "1.00 [1.00–1.00] (n = 6 + 7); degenerate CI: every resample gives the same AUROC",
        "5.8e-04 / 0.005 (smallest p at this n: 5.8e-04)",  # 1/1716 and 8/1716, see below
        "yes: neural_cleanse works at fp32",
    ]


def test_report_json_holds_the_metrics_under_its_schema(written):
    _, paths = written
    document = json.loads(paths["json"].read_text())
    ReportDocument.model_validate(document)
    metrics = document["primary_metrics"]
    assert metrics["protocol_version"] == 2 and metrics["protocol"] == "docs/protocol.md v2"
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


# ------------------------------------------------------------------------- v2: Mann–Whitney
def test_the_v2_claim_needs_the_ci_and_the_holm_adjusted_mann_whitney_test(group):
    """The group's Mann–Whitney family: NC, AC, SS and STRIP at fp32 and int8-static, every one
    scored on both sides (8 tests, FP32 included). NC, AC and STRIP separate 6 poisoned from 7
    clean perfectly at both precisions: p = 1/C(13, 6) = 1/1716 each; SS ties everything: p = 1.
    Holm: the six smallest get 8·, 7·, …, 3· 1/1716, made monotone: all 8/1716 = 0.00466; SS's
    two get 2·1 and 1·1, capped and monotone: 1."""
    assert group["holm_family"]["mann_whitney"] == 8
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert nc["p"] == pytest.approx(1 / 1716) and nc["p_holm"] == pytest.approx(8 / 1716)
    assert nc["holm_family"] == 8 and nc["ci_degenerate"] is True and nc["works"] is True
    ss = entry(group, "spectral_signatures", "int8-static")["auroc"]
    assert (ss["p"], ss["p_holm"], ss["ci_degenerate"], ss["works"]) == (1.0, 1.0, True, False)
    assert entry(group, "fine_pruning", "fp32")["auroc"] is None  # not in the family


def _only(defenses: list[str], seeds: list[int], precisions: list[str]) -> list[dict[str, Any]]:
    records = [r for r in make_records(seeds) if r["precision"] in precisions]
    for record in records:
        record["defenses"] = {n: record["defenses"][n] for n in defenses}
    return records


def test_three_plus_three_perfectly_separated_is_a_degenerate_ci_but_no_claim():
    """The protocol's example: 3 + 3 perfectly separated gives the CI [1, 1] and p = 1/20 =
    0.05, which does not reject even alone (p < α is needed); with NC at fp32 and int8-static
    the family is 2: Holm p = 2 · 0.05 = 0.1."""
    records = _only(["neural_cleanse"], [0, 1, 2], PRECISIONS)
    (group,) = metrics_of(records)["groups"]
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert nc["ci"] == [1.0, 1.0] and nc["ci_above_half"] is True and nc["ci_degenerate"]
    assert nc["p"] == pytest.approx(1 / 20) and nc["p_holm"] == pytest.approx(2 / 20)
    assert nc["works"] is False
    text = render_markdown({"config": CONFIG, "environment": {}, "runs": records, "summary": []})
    row = next(line for line in text.splitlines() if line.startswith("| neural_cleanse | fp32 | 1"))
    assert "degenerate CI" in row
    assert "not shown at n = 3 + 3 (Holm p ≥ 0.05)" in row
    assert "0.050 / 0.100 (smallest p at this n: 0.050)" in row


def test_five_plus_five_perfectly_separated_alone_rejects_at_one_in_252():
    (group,) = metrics_of(_only(["neural_cleanse"], [0, 1, 2, 3, 4], ["fp32"]))["groups"]
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert nc["p"] == pytest.approx(1 / 252) and nc["p_holm"] == pytest.approx(1 / 252)
    assert nc["holm_family"] == 1 and nc["works"] is True


def test_one_seed_has_a_mann_whitney_p_but_no_claim():
    (group,) = metrics_of(make_records([0]))["groups"]
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert nc["p"] == 0.5 and nc["works"] is None  # 1 + 1: two splits; no CI, no claim


# ------------------------------------------------------------------ v2: +inf is the top score
def _with_infinite_nc(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NC at fp32: poisoned seed 0 and clean seed 0 score +inf (a zero MAD, §4.1 v2)."""
    for record in records:
        if record["seed"] == 0 and record["precision"] == "fp32":
            record["defenses"]["neural_cleanse"]["score"] = float("inf")
    return records


def test_an_infinite_nc_score_enters_the_auroc_as_the_top_score():
    """Poisoned 3..8 with seed 0's 3 → +inf, clean 0.5..1.1 with seed 0's 0.5 → +inf (6 + 7).
    Pairs: poisoned +inf vs clean +inf ½, vs the 6 finite clean 6; the 5 finite poisoned lose
    to clean +inf (0) and beat the 6 finite clean (30): (½ + 6 + 30) / 42 = 36.5/42."""
    (group,) = metrics_of(_with_infinite_nc(make_records()))["groups"]
    nc = entry(group, "neural_cleanse", "fp32")["auroc"]
    assert (nc["n_poisoned"], nc["n_clean"], nc["missing_scores"]) == (6, 7, 0)
    assert nc["value"] == pytest.approx(36.5 / 42)
    assert model_score("neural_cleanse", {**_nc(0, True, "fp32"), "score": float("inf")}) == (
        float("inf")
    )
    assert model_score("neural_cleanse", {**_nc(0, True, "fp32"), "score": float("nan")}) is None


def test_an_infinite_score_survives_result_store_and_report_json(tmp_path):
    """The path of NC's +inf: the defense's result → the runner's record fields (pydantic JSON
    with the ``Infinity`` constant) → results.jsonl (``json.dumps``) → the report's runs →
    report.json (the string "Infinity") → back through the schema to ``float('inf')``."""
    inf = float("inf")
    norms = np.array([1.0, 5.0, 5.0, 5.0, 5.0])  # MAD 0, label 0 below the median
    index, _, mad = mad_anomaly_index(norms)
    assert mad == 0 and index[0] == inf and float(index[norms < 5.0].max()) == inf
    result = DefenseResult(
        defense="neural_cleanse", group="model_inspection", status="ok", verdict="detected",
        score=inf, score_name="max_anomaly_index_below_median",
        scores={"anomaly_index_label_0": inf, "broken": float("nan")},
    )  # fmt: skip
    fields, _ = result_fields({"neural_cleanse": result})
    assert fields["neural_cleanse"]["score"] == inf
    assert fields["neural_cleanse"]["scores"] == {"anomaly_index_label_0": inf, "broken": None}

    store = ResultStore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    for record in _with_infinite_nc(make_records([0, 1, 2])):
        store.append(record, {})
    assert '"score": Infinity' in (tmp_path / "results.jsonl").read_text()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "build_plots", lambda report, folder: [])
        paths = write_report(tmp_path)
    assert "| +∞ (max_anomaly_index_below_median) |" in paths["markdown"].read_text()
    text = paths["json"].read_text()
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    run = next(r for r in document["runs"] if r["seed"] == 0 and r["precision"] == "fp32")
    assert run["defenses"]["neural_cleanse"]["score"] == "Infinity"
    validated = ReportDocument.model_validate_json(text)
    again = next(r for r in validated.runs if r.seed == 0 and r.precision == "fp32")
    assert again.defenses["neural_cleanse"].score == inf
    rewritten = json.loads(validated.model_dump_json())  # and back out as the string
    assert [r["defenses"]["neural_cleanse"]["score"] for r in rewritten["runs"]] == [
        run["defenses"]["neural_cleanse"]["score"] for run in document["runs"]
    ]
    assert (
        sum(r["defenses"]["neural_cleanse"]["score"] == "Infinity" for r in document["runs"]) == 2
    )
    # the AUROC report.json states counted both +inf: 3 + 3, poisoned {inf, 4, 5} vs clean
    # {inf, 0.6, 0.7}: ½ + 2 + 0 + 2 + 0 + 2 = 6.5 of 9
    nc = next(e for e in document["primary_metrics"]["groups"][0]["defenses"]
              if (e["defense"], e["precision"]) == ("neural_cleanse", "fp32"))  # fmt: skip
    assert nc["auroc"]["value"] == pytest.approx(6.5 / 9) and nc["auroc"]["n_clean"] == 3


def test_the_schema_reads_and_writes_infinity_as_a_string():
    record = DefenseRecord.model_validate_json(
        '{"status": "ok", "score": "Infinity", "scores": {"a": "-Infinity", "b": null}}'
    )
    assert record.score == float("inf") and record.scores == {"a": float("-inf"), "b": None}
    assert json.loads(record.model_dump_json())["score"] == "Infinity"
    assert record.model_dump()["score"] == float("inf")  # Python mode keeps the float
    schema = json.loads(json_schema())["$defs"]["DefenseRecord"]["properties"]["score"]
    assert {"enum": ["Infinity", "-Infinity"]} in schema["anyOf"][0]["anyOf"]


# ----------------------------------------------------- v2: AC's −1 on inconclusive ok runs
def test_acs_minus_one_holds_for_an_inconclusive_ok_run_too():
    """§4.2 v2: a run where some classes could not be clustered and no other has a small
    cluster is inconclusive, keeps AC's score name and no score: it scores −1 and enters the
    AUROC (n), though no rate."""
    inconclusive = _ac(0, False, "fp32") | {
        "verdict": "inconclusive", "detected": None,
        "verdict_reason": "nothing flagged, but labels [3] could not be clustered",
    }  # fmt: skip
    assert model_score("activation_clustering", inconclusive) == -1.0
    records = make_records()
    for record in records:
        if record["seed"] == 2 and not record["poisoned"] and record["precision"] == "fp32":
            record["defenses"]["activation_clustering"] = inconclusive
    (group,) = metrics_of(records)["groups"]
    ac = entry(group, "activation_clustering", "fp32")
    assert ac["auroc"]["n_clean"] == 7 and ac["auroc"]["missing_scores"] == 0
    assert (ac["false_alarm"]["n"], ac["false_alarm"]["inconclusive"]) == (6, 1)


# ------------------------------------------------------------ v2 §1: missing defenses
def test_a_table_before_every_defense_has_run_says_which_are_missing():
    records = _only(["neural_cleanse", "strip"], SEEDS, PRECISIONS)
    for record in records:  # STRIP ran on seeds 0–4 only so far
        if record["seed"] > 4:
            del record["defenses"]["strip"]
    config = {**CONFIG, "defenses": ["neural_cleanse", "strip", "activation_clustering"]}
    report = {"config": config, "environment": {}, "runs": records, "summary": []}
    (group,) = primary_metrics(report, report_groups(report))["groups"]
    assert group["missing_defenses"] == [
        {"defense": "activation_clustering",
         "reason": "configured, but no finished cell of this group records it yet"},
        {"defense": "spectral_signatures",
         "reason": "not in this store's configuration: another sweep's, or not run yet"},
        {"defense": "fine_pruning",
         "reason": "not in this store's configuration: another sweep's, or not run yet"},
    ]  # fmt: skip
    assert group["incomplete_defenses"] == [
        {"defense": "strip", "cells_run": 20, "cells": 28, "seeds_incomplete": [5, 6]}
    ]
    assert {e["defense"] for e in group["defenses"]} == {"neural_cleanse", "strip"}  # no rows
    strip = entry(group, "strip", "int8-static")
    assert strip["false_alarm"]["n"] == 5 and strip["false_alarm"]["not_ok"] == 2  # not misses
    assert strip["paired_clean"]["left_out_missing"] == 2
    text = render_markdown(report)
    assert "**Not every pre-registered defense has run on this setup**" in text
    assert "`activation_clustering` (configured, but no finished cell" in text
    assert "`strip` on 20 of 28 cells (seeds lacking a cell: 5, 6)" in text
    ReportDocument.model_validate(
        {"schema_version": 1, "config": config, "environment": {}, "runs": records,
         "summary": [], "primary_metrics": primary_metrics(report, report_groups(report))}
    )  # fmt: skip


def test_a_complete_store_lists_nothing_missing(group):
    assert group["missing_defenses"] == [] and group["incomplete_defenses"] == []
