"""The primary metrics of docs/protocol.md v2 §5, computed from the stored runs.

Per (dataset, model, attack) group, pre-registered defense (§4.1–4.5) and precision:

1. the AUROC of the defense's model-level score (§4) between poisoned models and clean
   controls over all ``ok`` runs, with the stratified percentile-bootstrap 95% CI
   (:mod:`harness.report.stats`), and (v2) the exact one-sided Mann–Whitney test, Holm-adjusted
   over the group's family of such tests (:func:`mann_whitney_family`); the claim "D works at
   P" needs both the CI's lower end above 0.5 and the Holm-adjusted p below α. A degenerate CI
   (both ends equal: perfect separation or all tied) is marked. Fine-Pruning has none (a
   repair);
2. the detection rate (poisoned) and false-alarm rate (clean) over decided runs with Wilson
   95% intervals and the number of inconclusive runs; for Fine-Pruning the removal rate
   (poisoned) and accuracy-kept rate (clean), and the same for its no-fine-tune control;
3. the paired comparison of each quantized precision with FP32 over the same seeds: exact
   McNemar on the per-seed decided verdicts, poisoned models and clean controls tested
   separately, pairs with an inconclusive (or missing) side left out and counted; Holm over the
   defenses × quantized precisions of the group, separately per variant, unadjusted p beside.

Scores (§4): Neural Cleanse's ``+inf`` anomaly index (v2 §4.1) is a score that ranks above
every finite one, not a missing score; AC's −1 for "no small cluster" holds for every ``ok``
run, inconclusive ones included (v2 §4.2); STRIP's is the run's ``scores.auroc``, oriented
P(triggered entropy < clean entropy) by the defense (v2 §4.4).

Missing defenses (v2 §1): a setup's defenses may run in several sweeps, so a store may hold only
some of the pre-registered ones, or hold one on fewer cells than another. The group lists the
pre-registered defenses no cell of it ran and those that ran on only some of its cells; a
missing run is never a miss (it counts in no rate, AUROC or test).

Attack validity (§2) comes first: a poisoned model enters no rate, AUROC or paired test unless
its FP32 attack success is at least 0.90; such a seed is listed with its ASR (its clean control
stays in). A seed without a poisoned FP32 cell cannot show validity and is left out the same way.

Alongside, what §4 asks the tables to show: Neural Cleanse's step profile and the onnxruntime
confirmation rates of its flagged labels, Fine-Pruning's fine-tuning data source, STRIP's blend
and its TPR/FRR at both thresholds, and for AC/SS the measured poison fraction of the target
class, SS's removed fraction and poison recall and AC's smaller-cluster purity and recall.
Everything is read from the records; nothing here decides a verdict anew, and a field an older
record lacks is reported as not recorded.

The output is plain JSON data (``report.json``'s ``primary_metrics``, typed in
:mod:`harness.report.schema`); :func:`primary_sections` renders it for report.md/.html.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from harness.core.metrics import wilson_interval
from harness.core.verdicts import record_verdict
from harness.report.figures.evidence import seed_order
from harness.report.html import Section, Table
from harness.report.stats import (
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CI_LEVEL,
    auroc,
    bootstrap_auroc_ci,
    holm,
    mann_whitney_exact,
    mcnemar_exact,
    min_discordant_to_reject,
)
from harness.report.tally import GroupKey, group_key, group_label, ordered

PROTOCOL_VERSION = 2
PROTOCOL = "docs/protocol.md v2"
PREREGISTERED = (
    "neural_cleanse",
    "activation_clustering",
    "spectral_signatures",
    "strip",
    "fine_pruning",
)
"""The defenses protocol v2 pre-registers for every setup (§4.1–4.5); others get no primary
metric (§4.6)."""
MW_FAMILY = "every precision, FP32 included"
"""Which Mann–Whitney tests share the Holm family of "D works at P" (v2 §5, as clarified).

Every defense × precision of the group with both sides scored, FP32 included, because "D works
at FP32" is a claim too (the McNemar family stays the quantized precisions). Consequence at the
protocol's sizes: with 4 AUROC defenses × 4 precisions = 16 tests, 5 + 5 models (smallest
p = 1/252) cannot reject (16/252 = 0.063); 10 + 10 models (smallest p = 1/184,756) can."""
REFERENCE = "fp32"
MIN_ASR = 0.90
"""§2: the FP32 attack success a poisoned model needs to enter any rate."""
SCORE_NAMES = {
    "neural_cleanse": "max_anomaly_index_below_median",
    "activation_clustering": "max_silhouette_among_small_clusters",
    "spectral_signatures": "max_spectral_gap_robust_z",
    "strip": "input_auroc",
}
"""§4's model-level score per defense (STRIP's is its within-run input AUROC, ``scores.auroc``)."""
AC_NO_SMALL_CLUSTER = -1.0
"""§4.2: a model with no class below the size threshold scores −1 (the silhouette's minimum)."""
NC_CONFIRMATION = "not confirmed on the deployed session"
"""Words of Neural Cleanse's ``verdict_reason`` when confirmation made a verdict inconclusive."""

Cells = dict[tuple[Any, bool, str], dict[str, Any]]


def model_score(defense: str, res: dict[str, Any] | None) -> float | None:
    """The §4 model-level score of one stored result; ``None`` when it has none.

    Only ``ok`` runs score (inconclusive ones included: the score exists). The stored ``score``
    is used only where its ``score_name`` is the protocol's, so a record from an older rule is
    not silently mixed in. AC's missing score (no small cluster) is the protocol's −1, for
    inconclusive ``ok`` runs too (v2 §4.2). ``+inf`` is a score (v2 §4.1: Neural Cleanse's index
    when the MAD is 0), ranked above every finite one; so is ``-inf``, ranked below. NaN, or a
    value that is not a number, is no score (``missing_scores``). A ``+inf`` reaches here as a
    float: ``results.jsonl`` holds it as ``Infinity`` (Python's ``json``), and ``report.json``'s
    ``"Infinity"`` string is turned back into one by its schema (:mod:`harness.report.schema`).
    """
    if not res or record_verdict(res) is None or defense not in SCORE_NAMES:
        return None
    if defense == "strip":
        value = (res.get("scores") or {}).get("auroc")
    elif res.get("score_name") != SCORE_NAMES[defense]:
        return None
    else:
        value = res.get("score")
        if value is None and defense == "activation_clustering":
            value = AC_NO_SMALL_CLUSTER
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def wilson_rate(k: int, n: int, inconclusive: int = 0, not_run: int = 0) -> dict[str, Any]:
    """A rate over ``n`` decided runs with its Wilson 95% interval (none when ``n`` is 0)."""
    return {
        "k": k,
        "n": n,
        "rate": k / n if n else None,
        "ci": list(wilson_interval(k, n)) if n else None,
        "inconclusive": inconclusive,
        "not_ok": not_run,
    }


def verdict_rate(results: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Detected over decided runs; inconclusive and failed (error, n/a, missing) runs counted."""
    verdicts = [record_verdict(r) if r else None for r in results]
    decided = [v for v in verdicts if v in ("detected", "not_detected")]
    return wilson_rate(
        sum(v == "detected" for v in decided),
        len(decided),
        sum(v == "inconclusive" for v in verdicts),
        sum(v is None for v in verdicts),
    )


def control_rate(results: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Fine-Pruning's no-fine-tune control: its success rule over every ``ok`` run carrying it.

    The control does not depend on the fine-tuning, so a run made inconclusive only by a
    missing retrainer still has a decided control; runs whose records lack it are ``not_ok``.
    """
    controls = [
        ((r.get("details") or {}).get("control_no_fine_tune") if r and record_verdict(r) else None)
        for r in results
    ]
    known = [c for c in controls if isinstance(c, dict) and "success" in c]
    return wilson_rate(
        sum(bool(c["success"]) for c in known), len(known), 0, len(controls) - len(known)
    )


def auroc_entry(defense: str, poisoned: list[dict[str, Any]], clean: list[dict[str, Any]]) -> Any:
    """§5.1 for one defense and precision: the AUROC, its bootstrap CI (or why there is none) and
    the exact one-sided Mann–Whitney p (v2); ``p_holm`` and ``works`` are set once the group's
    family is known (:func:`mann_whitney_family`)."""
    pos = [model_score(defense, r) for r in poisoned if r and record_verdict(r)]
    neg = [model_score(defense, r) for r in clean if r and record_verdict(r)]
    pos_ok = [s for s in pos if s is not None]
    neg_ok = [s for s in neg if s is not None]
    entry: dict[str, Any] = {
        "score_name": SCORE_NAMES[defense],
        "n_poisoned": len(pos_ok),
        "n_clean": len(neg_ok),
        "missing_scores": (len(pos) - len(pos_ok)) + (len(neg) - len(neg_ok)),
        "value": None,
        "ci": None,
        "note": None,
        "ci_above_half": None,
        "ci_degenerate": None,
        "p": None,
        "p_holm": None,
        "holm_family": 0,
        "works": None,
    }
    if not pos_ok or not neg_ok:
        entry["note"] = "no score on one side"
        return entry
    entry["value"] = auroc(pos_ok, neg_ok)
    entry["p"] = mann_whitney_exact(pos_ok, neg_ok)
    if min(len(pos_ok), len(neg_ok)) < 2:
        entry["note"] = "n too small"
        return entry
    low, high = bootstrap_auroc_ci(pos_ok, neg_ok)
    entry["ci"] = [low, high]
    entry["ci_above_half"] = low > 0.5
    entry["ci_degenerate"] = low == high
    return entry


def mann_whitney_family(entries: list[dict[str, Any]]) -> int:
    """Holm over the group's Mann–Whitney tests, and the v2 claim "D works at P" per entry.

    The family is formed as the McNemar one is: every defense × precision entry of the group
    whose test has a p-value (both sides scored), here with FP32's entries included
    (:data:`MW_FAMILY` says why). ``works`` is ``True`` when
    the CI's lower end is above 0.5 **and** the Holm-adjusted p is below α, ``False`` when a CI
    exists and either fails, ``None`` without a CI. Returns the family's size.
    """
    family = [e["auroc"] for e in entries if e["auroc"] and e["auroc"]["p"] is not None]
    for a, p in zip(family, holm([a["p"] for a in family]), strict=True):
        a["p_holm"] = p
        a["holm_family"] = len(family)
    for e in entries:
        a = e["auroc"]
        if a and a["ci_above_half"] is not None:
            a["works"] = bool(
                a["ci_above_half"] and a["p_holm"] is not None and a["p_holm"] < ALPHA
            )
    return len(family)


def paired_entry(
    reference: list[dict[str, Any] | None], other: list[dict[str, Any] | None]
) -> dict[str, Any]:
    """§5.3's counts for one variant: per seed, FP32's decided verdict against the precision's."""
    counts = Counter[str]()
    for ref, res in zip(reference, other, strict=True):
        at_fp32 = record_verdict(ref) if ref else None
        at_other = record_verdict(res) if res else None
        if at_fp32 is None or at_other is None:
            counts["left_out_missing"] += 1
        elif "inconclusive" in (at_fp32, at_other):
            counts["left_out_inconclusive"] += 1
        else:
            key = {
                (True, True): "both",
                (True, False): "fp32_only",
                (False, True): "precision_only",
            }
            counts[key.get((at_fp32 == "detected", at_other == "detected"), "neither")] += 1
    b, c = counts["fp32_only"], counts["precision_only"]
    n_pairs = b + c + counts["both"] + counts["neither"]
    return {
        "n_pairs": n_pairs,
        "fp32_only": b,
        "precision_only": c,
        "both": counts["both"],
        "neither": counts["neither"],
        "left_out_inconclusive": counts["left_out_inconclusive"],
        "left_out_missing": counts["left_out_missing"],
        "p": mcnemar_exact(b, c) if n_pairs else None,
        "p_holm": None,
        "holm_family": 0,
        "reading": None,
    }


def _reading(entry: dict[str, Any], defense: str, precision: str, poisoned: bool, repair: bool):
    """The protocol's words for a paired test: a claim only on a Holm rejection, never
    "unchanged" on a non-rejection, with the power at this n."""
    n = entry["n_pairs"]
    if n == 0:
        return "no usable pair"
    if entry["p_holm"] is not None and entry["p_holm"] < ALPHA:
        verb = (
            ("removes more" if poisoned else "keeps accuracy more")
            if repair
            else ("detects more" if poisoned else "false-alarms more")
        )
        if entry["fp32_only"] > entry["precision_only"]:
            if poisoned and not repair:
                return f"FP32 detects more: quantization to {precision} blinds {defense}"
            return f"FP32 {verb}"
        return f"{precision} {verb} than FP32"
    needed = min_discordant_to_reject()
    power = f" (fewer than {needed} usable pairs cannot reject)" if n < needed else ""
    return f"no evidence of a change at n = {n}{power}"


def attack_validity(cells: Cells, seeds: list[Any]) -> tuple[set[Any], list[dict[str, Any]]]:
    """§2: the seeds whose poisoned model may enter the rates, and the others with why."""
    valid, invalid = set(), []
    for seed in seeds:
        run = cells.get((seed, True, REFERENCE))
        if run is None:
            if any(key[0] == seed and key[1] for key in cells):
                invalid.append({"seed": seed, "fp32_asr": None, "reason": "no FP32 poisoned cell"})
            continue
        asr = run.get("asr")
        if isinstance(asr, int | float) and asr >= MIN_ASR:
            valid.add(seed)
        else:
            invalid.append({"seed": seed, "fp32_asr": asr, "reason": f"FP32 ASR < {MIN_ASR}"})
    return valid, invalid


def _group_cells(runs: list[dict[str, Any]]) -> tuple[Cells, int]:
    """(seed, poisoned, precision) → run, first copy kept; and how many later copies clashed."""
    cells: Cells = {}
    clashes = 0
    for run in runs:
        key = (run.get("seed"), bool(run["poisoned"]), run["precision"])
        if key in cells:
            clashes += 1
            continue
        cells[key] = run
    return cells, clashes


def _res(run: dict[str, Any] | None, defense: str) -> dict[str, Any] | None:
    return None if run is None else (run.get("defenses") or {}).get(defense)


def group_metrics(report: dict[str, Any], key: GroupKey) -> dict[str, Any]:
    """Every §5 metric of one (dataset, model, attack) group."""
    runs = [r for r in report["runs"] if group_key(r) == key]
    cells, clashes = _group_cells(runs)
    seeds = sorted({seed for seed, _, _ in cells}, key=seed_order)
    precisions = ordered(
        {p for _, _, p in cells}, list(report.get("config", {}).get("precisions") or [])
    )
    valid, invalid = attack_validity(cells, seeds)
    present = {name for run in runs for name in run.get("defenses") or {}}
    defenses = [d for d in PREREGISTERED if d in present]

    def results(defense: str, poisoned: bool, precision: str) -> list[dict[str, Any] | None]:
        use = [s for s in seeds if s in valid] if poisoned else seeds
        return [_res(cells.get((s, poisoned, precision)), defense) for s in use]

    entries = []
    for defense in defenses:
        repair = defense == "fine_pruning"
        for precision in precisions:
            poisoned = [r for r in results(defense, True, precision) if r]
            clean = [r for r in results(defense, False, precision) if r]
            if not poisoned and not clean:
                continue
            entry: dict[str, Any] = {
                "defense": defense,
                "precision": precision,
                "auroc": None if repair else auroc_entry(defense, poisoned, clean),
                "detection": None if repair else verdict_rate(results(defense, True, precision)),
                "false_alarm": None if repair else verdict_rate(results(defense, False, precision)),
                "repair": _repair(defense, precision, results) if repair else None,
                "paired_poisoned": None,
                "paired_clean": None,
            }
            if precision != REFERENCE and REFERENCE in precisions:
                for variant, flag in (("paired_poisoned", True), ("paired_clean", False)):
                    entry[variant] = paired_entry(
                        results(defense, flag, REFERENCE), results(defense, flag, precision)
                    )
            entries.append(entry)
    families = {}
    for variant, flag in (("paired_poisoned", True), ("paired_clean", False)):
        family = [e for e in entries if e[variant] and e[variant]["p"] is not None]
        for e, p in zip(family, holm([e[variant]["p"] for e in family]), strict=True):
            e[variant]["p_holm"] = p
            e[variant]["holm_family"] = len(family)
        for e in entries:
            if e[variant]:
                e[variant]["reading"] = _reading(
                    e[variant], e["defense"], e["precision"], flag, e["defense"] == "fine_pruning"
                )
        families[variant] = len(family)
    families["mann_whitney"] = mann_whitney_family(entries)
    missing, incomplete = missing_defenses(report, cells, present)
    return {
        "dataset": key[0],
        "model": key[1],
        "attack": key[2],
        "seeds": seeds,
        "precisions": precisions,
        "invalid_attacks": invalid,
        "duplicate_cells": clashes,
        "holm_family": families,
        "defenses": entries,
        "not_preregistered": sorted(present - set(PREREGISTERED)),
        "missing_defenses": missing,
        "incomplete_defenses": incomplete,
        "neural_cleanse": _nc_rows(cells, seeds, valid, precisions)
        if "neural_cleanse" in present
        else [],
        "regime": _regime_rows(cells, seeds, valid, precisions),
        "strip": _strip_rows(cells, seeds, valid, precisions) if "strip" in present else [],
    }


def missing_defenses(
    report: dict[str, Any], cells: Cells, present: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """v2 §1: the pre-registered defenses no cell of the group ran (with why, as far as the
    store can tell), and those that ran on only some of its cells (with the seeds lacking one).

    Missing runs are never misses: they count in no rate, AUROC or test; the paired tests count
    them as ``left_out_missing`` and the rates as ``not_ok``.
    """
    listed = report.get("config", {}).get("defenses")
    configured = set(listed) if isinstance(listed, list) else None
    missing = []
    for name in PREREGISTERED:
        if name in present:
            continue
        if configured is None:
            reason = "no finished cell of this group records it"
        elif name in configured:
            reason = "configured, but no finished cell of this group records it yet"
        else:
            reason = "not in this store's configuration: another sweep's, or not run yet"
        missing.append({"defense": name, "reason": reason})
    incomplete = []
    for name in (d for d in PREREGISTERED if d in present):
        lacking = [key for key, run in cells.items() if name not in (run.get("defenses") or {})]
        if lacking:
            incomplete.append(
                {
                    "defense": name,
                    "cells_run": len(cells) - len(lacking),
                    "cells": len(cells),
                    "seeds_incomplete": sorted({key[0] for key in lacking}, key=seed_order),
                }
            )
    return missing, incomplete


def _repair(defense: str, precision: str, results: Any) -> dict[str, Any]:
    """§5.2 for Fine-Pruning: removal / accuracy kept, fine-tuned and not (the control)."""
    poisoned, clean = results(defense, True, precision), results(defense, False, precision)
    sources = Counter(
        str((r.get("details") or {}).get("fine_tune_data") or "not recorded")
        for r in [*poisoned, *clean]
        if r and record_verdict(r)
    )
    return {
        "removal": verdict_rate(poisoned),
        "accuracy_kept": verdict_rate(clean),
        "control_removal": control_rate(poisoned),
        "control_accuracy_kept": control_rate(clean),
        "fine_tune_data": dict(sorted(sources.items())),
    }


def _nc_rows(cells: Cells, seeds: list[Any], valid: set[Any], precisions: list[str]):
    """Per precision and variant: NC's profile and the ORT confirmation of its flags (§4.1)."""
    rows = []
    for precision in precisions:
        for poisoned in (True, False):
            use = [s for s in seeds if s in valid] if poisoned else seeds
            found = [
                (s, r)
                for s in use
                if (r := _res(cells.get((s, poisoned, precision)), "neural_cleanse"))
                and record_verdict(r)
            ]
            if not found:
                continue
            profiles: Counter[str] = Counter()
            thresholds: set[Any] = set()
            flags: list[dict[str, Any]] = []
            not_recorded = made_inconclusive = 0
            for seed, res in found:
                details = res.get("details") or {}
                profile = str(details.get("profile") or "not recorded")
                profiles[profile + (" (custom step)" if details.get("custom_step") else "")] += 1
                thresholds.add(details.get("ort_confirm_threshold"))
                before = details.get("flagged_before_confirmation")
                rates = details.get("ort_attack_success")
                if before is None or rates is None:
                    not_recorded += 1
                    continue
                unconfirmed = set(details.get("unconfirmed_labels") or [])
                for label in before:
                    rate = rates[label] if 0 <= int(label) < len(rates) else None
                    flags.append(
                        {
                            "seed": seed,
                            "label": int(label),
                            "rate": rate,
                            "confirmed": int(label) not in unconfirmed,
                        }
                    )
                made_inconclusive += NC_CONFIRMATION in str(res.get("verdict_reason") or "")
            known = sorted(t for t in thresholds if t is not None)
            rows.append(
                {
                    "precision": precision,
                    "poisoned": poisoned,
                    "runs": len(found),
                    "profiles": dict(sorted(profiles.items())),
                    "confirm_threshold": known[0] if len(known) == 1 else None,
                    "not_recorded": not_recorded,
                    "flags": flags,
                    "confirmed": sum(f["confirmed"] for f in flags),
                    "made_inconclusive": made_inconclusive,
                }
            )
    return rows


def _mean(values: list[Any]) -> float | None:
    known = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(known) / len(known) if known else None


def _strip_rows(cells: Cells, seeds: list[Any], valid: set[Any], precisions: list[str]):
    """Per precision and variant: STRIP's blend and its TPR/FRR at both thresholds (§4.4),
    means over the ``ok`` runs (on a clean control the "triggered" inputs carry a trigger the
    model never learned)."""
    rows = []
    for precision in precisions:
        for poisoned in (True, False):
            use = [s for s in seeds if s in valid] if poisoned else seeds
            found = [
                r
                for s in use
                if (r := _res(cells.get((s, poisoned, precision)), "strip")) and record_verdict(r)
            ]
            if not found:
                continue
            blends: Counter[str] = Counter()
            rates: dict[str, list[Any]] = {}
            for res in found:
                params, scores = res.get("params") or {}, res.get("scores") or {}
                blends[str(params.get("blend") or "not recorded")] += 1
                fit = str(params.get("threshold_fit") or "normal")
                other = "empirical" if fit == "normal" else "normal"
                for rate in ("tpr", "frr"):
                    rates.setdefault(f"{rate}_{fit}", []).append(scores.get(rate))
                    rates.setdefault(f"{rate}_{other}", []).append(
                        scores.get(f"{rate}_{other}_threshold")
                    )
            rows.append(
                {
                    "precision": precision,
                    "poisoned": poisoned,
                    "runs": len(found),
                    "blends": dict(sorted(blends.items())),
                    **{
                        f"{rate}_{fit}": _mean(rates.get(f"{rate}_{fit}", []))
                        for rate in ("tpr", "frr")
                        for fit in ("normal", "empirical")
                    },
                }
            )
    return rows


def _regime_rows(cells: Cells, seeds: list[Any], valid: set[Any], precisions: list[str]):
    """Per poisoned cell (valid attacks only): AC's and SS's operating regime (§4.2, §4.3, §5)."""
    rows = []
    for precision in precisions:
        for seed in (s for s in seeds if s in valid):
            run = cells.get((seed, True, precision))
            ac, ss = _res(run, "activation_clustering"), _res(run, "spectral_signatures")
            if not (ac and record_verdict(ac)) and not (ss and record_verdict(ss)):
                continue
            ac_d = (ac or {}).get("details") or {}
            ss_d = (ss or {}).get("details") or {}
            ac_t, ss_t = ac_d.get("target_class") or {}, ss_d.get("target_class") or {}
            rows.append(
                {
                    "seed": seed,
                    "precision": precision,
                    "target_poison_fraction": ss_t.get(
                        "poison_fraction_of_class", ac_t.get("poison_fraction_of_class")
                    ),
                    "ss_removed_fraction": ss_d.get("removed_fraction"),
                    "ss_poison_recall": (ss_d.get("filtering") or {}).get("poison_recall"),
                    "ss_epsilon_source": ss_d.get("epsilon_source"),
                    "ss_flagged": (ss or {}).get("flagged_labels"),
                    "ac_purity": ac_t.get("smaller_cluster_poison_fraction"),
                    "ac_recall": ac_t.get("smaller_cluster_poison_recall"),
                    "ac_flagged": (ac or {}).get("flagged_labels"),
                }
            )
    return rows


def primary_metrics(report: dict[str, Any], keys: list[GroupKey]) -> dict[str, Any]:
    """``report.json``'s ``primary_metrics``: provenance, the fixed settings, and the groups
    ``keys`` (in the report's order, :func:`harness.report.data.report_groups`)."""
    env = report.get("environment") or {}
    return {
        "protocol_version": PROTOCOL_VERSION,
        "protocol": PROTOCOL,
        "provenance": {
            "blindspots": env.get("blindspots"),
            "git_commit": env.get("git_commit"),
            "git_dirty": env.get("git_dirty"),
        },
        "settings": {
            "defenses": list(PREREGISTERED),
            "reference_precision": REFERENCE,
            "min_fp32_asr": MIN_ASR,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "bootstrap_seed": BOOTSTRAP_SEED,
            "ci_level": CI_LEVEL,
            "alpha": ALPHA,
            "min_discordant_to_reject": min_discordant_to_reject(),
            "mann_whitney_family": MW_FAMILY,
        },
        "groups": [group_metrics(report, key) for key in keys],
    }


# ---------------------------------------------------------------------------------- rendering
def _num(value: Any, digits: int = 2) -> str:
    return "—" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _rate_text(rate: dict[str, Any] | None, recorded_only: bool = False) -> str:
    """``k/n [lo–hi]`` over decided runs, then what is outside the rate; ``recorded_only``:
    a rate over what records carry a field (the control), whose absence is 'not recorded'."""
    if rate is None:
        return "—"
    if recorded_only and not rate["n"]:
        return f"not recorded ({rate['not_ok']} runs)" if rate["not_ok"] else "—"
    if recorded_only and rate["not_ok"]:
        low, high = rate["ci"]
        return f"{rate['k']}/{rate['n']} [{low:.2f}–{high:.2f}]; {rate['not_ok']} not recorded"
    if rate["n"]:
        low, high = rate["ci"]
        parts = [f"{rate['k']}/{rate['n']} [{low:.2f}–{high:.2f}]"]
    else:
        parts = ["0 decided"]
    if rate["inconclusive"]:
        parts.append(f"{rate['inconclusive']} inconclusive")
    if rate["not_ok"]:
        parts.append(f"{rate['not_ok']} n/a, error or missing")
    return "; ".join(parts)


def _auroc_text(entry: dict[str, Any]) -> str:
    n = f"n = {entry['n_poisoned']} + {entry['n_clean']}"
    if entry["value"] is None:
        text = f"— ({entry['note']}; {n})"
    elif entry["ci"] is None:
        text = f"{entry['value']:.2f} (n too small for a CI: {n})"
    else:
        low, high = entry["ci"]
        text = f"{entry['value']:.2f} [{low:.2f}–{high:.2f}] ({n})"
        if low == high:
            text += "; degenerate CI: every resample gives the same AUROC"
    if entry["missing_scores"]:
        text += f"; {entry['missing_scores']} ok run(s) without the score"
    return text


def _mw_text(entry: dict[str, Any]) -> str:
    """``p / Holm p``, with the smallest p this n allows (perfect separation: 1/C(N, n⁺))."""
    if entry["p"] is None:
        return "—"
    n_pos, n_neg = entry["n_poisoned"], entry["n_clean"]
    smallest = 1 / math.comb(n_pos + n_neg, n_pos)
    return f"{_p(entry['p'])} / {_p(entry['p_holm'])} (smallest p at this n: {_p(smallest)})"


def _works_text(entry: dict[str, Any], defense: str, precision: str) -> str:
    """v2 §5: "D works at P" needs the CI's lower end above 0.5 and the Holm-adjusted exact
    Mann–Whitney p below α; otherwise it is not shown at this n, and the text says which part
    failed (never "does not work")."""
    if entry["works"] is None:
        return "—"
    if entry["works"]:
        return f"yes: {defense} works at {precision}"
    failed = []
    if not entry["ci_above_half"]:
        failed.append("CI lower end ≤ 0.5")
    if entry["p_holm"] is None or entry["p_holm"] >= ALPHA:
        failed.append(f"Holm p ≥ {ALPHA}")
    return f"not shown at n = {entry['n_poisoned']} + {entry['n_clean']} ({', '.join(failed)})"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"


def stamp(metrics: dict[str, Any]) -> str:
    """What every primary-metrics table's title carries (protocol §1): the protocol version of
    the metrics and the commit that produced the runs."""
    commit = metrics["provenance"].get("git_commit")
    dirty = " (uncommitted changes)" if metrics["provenance"].get("git_dirty") else ""
    made = f"commit {commit[:12]}{dirty}" if commit else "commit not recorded"
    return f"protocol v{metrics['protocol_version']}, {made}"


def _provenance(metrics: dict[str, Any]) -> str:
    prov = metrics["provenance"]
    version = f"blindspots {prov['blindspots']}" if prov.get("blindspots") else "version unknown"
    if prov.get("git_commit"):
        tree = {True: ", with uncommitted changes", False: "", None: ""}[prov.get("git_dirty")]
        return f"Runs produced by {version}, commit `{prov['git_commit'][:12]}`{tree}."
    return (
        f"Runs produced by {version}; the commit that produced them is not recorded in "
        "`environment.json` (runs older than that record), so they cannot be placed before or "
        "after the protocol's commit."
    )


def _intro(metrics: dict[str, Any]) -> list[Any]:
    settings = metrics["settings"]
    return [
        f"Computed as {metrics['protocol']} §5 pre-registers them (metrics: protocol "
        f"v{metrics['protocol_version']}). {_provenance(metrics)} Every table below names the "
        "protocol version and that commit. Whether these runs are "
        f"v{metrics['protocol_version']} *results* also depends on their setup and budgets "
        "(§2, §4); this section computes the metrics for whatever the store holds.",
        "Per defense and precision: *AUROC* of the model-level score (§4) between poisoned models "
        "and clean controls over every `ok` run (inconclusive included), ties counted ½, with a "
        f"percentile bootstrap {settings['ci_level']:.0%} CI ({settings['bootstrap_resamples']:,} "
        "resamples drawn within each group, generator seed "
        f"{settings['bootstrap_seed']}); a CI needs at least two scores per group, and where "
        "the groups are perfectly separated (or all tied) every resample gives the same AUROC, "
        "so the interval has no width whatever n is (marked *degenerate CI*). *Mann–Whitney*: "
        "the exact one-sided test, poisoned scores higher, over every split of the pooled "
        "scores into groups of the observed sizes, ties by midranks; its smallest p is "
        "1/C(n⁺ + n⁻, n⁺) (3 + 3: 0.05; 5 + 5: 1/252). Holm over the group's Mann–Whitney "
        "tests at every precision, FP32 included (the protocol's family is the defenses × "
        "quantized precisions; FP32's test is put in it rather than left unadjusted). "
        '*Works*: "D works at P" needs the CI\'s lower end above 0.5 **and** the Holm-adjusted '
        f"p below α = {settings['alpha']} (v2). Scores of +∞ (Neural Cleanse with a zero MAD) "
        "rank above every finite score, two of them tie. *Detection* "
        "(poisoned; target flagged) and *false alarms* (clean; anything flagged) over decided "
        "runs with Wilson 95% intervals; inconclusive runs count in no rate. *Paired*: each "
        "quantized precision against FP32 over the same seeds, exact McNemar (two-sided "
        "binomial on the discordant pairs), pairs with an inconclusive or missing side left out "
        "and counted; Holm over the defenses × quantized precisions of a group, poisoned models "
        f"and clean controls as separate families, α = {settings['alpha']}. A non-rejection is "
        "no evidence of a change at that n, never a finding of none; fewer than "
        f"{settings['min_discordant_to_reject']} usable pairs cannot reject at all.",
        f"Attack validity (§2): a poisoned model enters no rate, AUROC or paired test unless its "
        f"FP32 ASR is ≥ {settings['min_fp32_asr']:.2f}; its clean control stays in.",
    ]


def _missing_blocks(group: dict[str, Any]) -> list[Any]:
    """v2 §1: which pre-registered defenses this table lacks, and where one ran on fewer cells."""
    blocks: list[Any] = []
    missing = group.get("missing_defenses") or []
    incomplete = group.get("incomplete_defenses") or []
    if missing:
        listed = "; ".join(f"`{m['defense']}` ({m['reason']})" for m in missing)
        blocks.append(
            "**Not every pre-registered defense has run on this setup** (protocol §1, v2): "
            f"missing {listed}. They are missing, not misses: no rate, AUROC or test counts "
            "them. The Holm families below hold only the tests present, so their adjusted "
            "p-values are interim: once the missing defenses run, the families grow and no "
            "adjusted p-value can fall."
        )
    if incomplete:
        listed = "; ".join(
            f"`{m['defense']}` on {m['cells_run']} of {m['cells']} cells (seeds lacking a cell: "
            f"{', '.join(map(str, m['seeds_incomplete']))})"
            for m in incomplete
        )
        blocks.append(
            f"Ran on only some of this group's cells: {listed}. The cells without it are "
            "missing (*n/a, error or missing* in the rates, *left out: missing* in the paired "
            "tests), never misses; the metrics of these defenses are interim until they run."
        )
    return blocks


def _group_blocks(group: dict[str, Any]) -> list[Any]:
    blocks: list[Any] = [f"Seeds {group['seeds']}, precisions {group['precisions']}."]
    blocks += _missing_blocks(group)
    if group["invalid_attacks"]:
        listed = ", ".join(
            f"seed {row['seed']} ({row['reason']}"
            + (f": {row['fp32_asr']:.3f}" if isinstance(row["fp32_asr"], int | float) else "")
            + ")"
            for row in group["invalid_attacks"]
        )
        blocks.append(
            f"Poisoned models left out of every rate and test (attack not valid): {listed}."
        )
    if group["duplicate_cells"]:
        blocks.append(
            f"{group['duplicate_cells']} cell(s) repeat a seed, variant and precision of this "
            "group (another attack setting?); only the first of each is used here."
        )
    if group["not_preregistered"]:
        names = ", ".join(f"`{n}`" for n in group["not_preregistered"])
        blocks.append(f"Not pre-registered in the protocol, so without primary metrics: {names}.")
    profiles = Counter[str]()
    for row in group["neural_cleanse"]:
        profiles.update(row["profiles"])
    others = sorted(set(profiles) - {"paper", "not recorded"})
    if others:
        named = ", ".join(f"`{p}` ({profiles[p]} runs)" for p in others)
        blocks.append(
            f"Neural Cleanse ran at {named}, not the protocol's `paper` budget: those runs are "
            "descriptive only (§2), no claim about the defense rests on them."
        )
    if profiles["not recorded"]:
        blocks.append(
            f"{profiles['not recorded']} Neural Cleanse run(s) record no profile (they predate "
            "the protocol's profiles), so they cannot be shown to run its `paper` budget."
        )
    detecting = [e for e in group["defenses"] if e["auroc"] is not None]
    if detecting:
        body = tuple(
            (
                e["defense"],
                e["precision"],
                _auroc_text(e["auroc"]),
                _mw_text(e["auroc"]),
                _works_text(e["auroc"], e["defense"], e["precision"]),
                _rate_text(e["detection"]),
                _rate_text(e["false_alarm"]),
            )
            for e in detecting
        )
        header = (
            "defense",
            "precision",
            "AUROC [95% CI] (poisoned + clean)",
            "Mann–Whitney p / Holm p",
            "works (CI above 0.5 and Holm p < α)",
            "detection [Wilson 95%]",
            "false alarms [Wilson 95%]",
        )
        blocks.append(
            f"Exact Mann–Whitney tests: Holm over the group's "
            f"{group['holm_family'].get('mann_whitney', 0)} (every defense × precision of the "
            "group with a score on both sides, FP32 included)."
        )
        blocks.append(Table(header, body))
    paired = [
        (e, variant)
        for e in group["defenses"]
        for variant in ("paired_poisoned", "paired_clean")
        if e[variant]
    ]
    if paired:
        families = group["holm_family"]
        blocks.append(
            f"Paired with FP32 (exact McNemar; Holm over {families['paired_poisoned']} "
            f"poisoned-model and {families['paired_clean']} clean-control tests). *FP32 only* / "
            "*P only*: seeds "
            "where only FP32 / only the quantized precision detected (on a clean control: "
            "false-alarmed; for Fine-Pruning: removed the backdoor / kept accuracy)."
        )
        rows = []
        for e, variant in paired:
            t = e[variant]
            rows.append(
                (
                    e["defense"],
                    e["precision"],
                    "poisoned" if variant == "paired_poisoned" else "clean",
                    f"{t['fp32_only']} / {t['precision_only']} / {t['both']} / {t['neither']}",
                    f"{t['left_out_inconclusive']} / {t['left_out_missing']}",
                    _p(t["p"]),
                    _p(t["p_holm"]),
                    t["reading"] or "—",
                )
            )
        paired_header = (
            "defense",
            "precision",
            "variant",
            "FP32 only / P only / both / neither",
            "left out: inconclusive / missing",
            "p",
            "Holm p",
            "reading",
        )
        blocks.append(Table(paired_header, tuple(rows)))
    elif group["defenses"]:
        blocks.append("No paired comparison: the group has no FP32 cell or no quantized one.")
    return blocks


def _repair_blocks(group: dict[str, Any]) -> list[Any]:
    entries = [e for e in group["defenses"] if e["repair"]]
    if not entries:
        return []
    body = tuple(
        (
            e["defense"],
            e["precision"],
            _rate_text(e["repair"]["removal"]),
            _rate_text(e["repair"]["accuracy_kept"]),
            _rate_text(e["repair"]["control_removal"], recorded_only=True),
            _rate_text(e["repair"]["control_accuracy_kept"], recorded_only=True),
            ", ".join(f"{k} ({v})" for k, v in e["repair"]["fine_tune_data"].items()) or "—",
        )
        for e in entries
    )
    header = (
        "defense",
        "precision",
        "removal (poisoned)",
        "accuracy kept (clean)",
        "control: removal",
        "control: accuracy kept",
        "fine-tuning data (runs)",
    )
    return [
        "Fine-Pruning is a repair (§4.5): *removal* = final ASR ≤ 0.20 with accuracy loss ≤ 0.05 "
        "on poisoned models, *accuracy kept* = accuracy loss ≤ 0.05 on clean controls, Wilson "
        "95%. The *control* applies the same rule to the pruned model before fine-tuning "
        "(`control_no_fine_tune`, over every ok run that records it): fine-tuning's effect is "
        "the difference between the two.",
        Table(header, body),
    ]


def _flags_text(flags: list[dict[str, Any]]) -> str:
    by_seed: dict[Any, list[str]] = {}
    for f in flags:
        mark = "✓" if f["confirmed"] else "✗"
        by_seed.setdefault(f["seed"], []).append(f"{f['label']}: {_num(f['rate'])} {mark}")
    return "; ".join(f"s{seed}: {', '.join(items)}" for seed, items in by_seed.items()) or "—"


def _confirmed_text(row: dict[str, Any]) -> str:
    if row["not_recorded"] == row["runs"]:
        return "not recorded"
    text = f"{row['confirmed']}/{len(row['flags'])}"
    return text + (f"; {row['not_recorded']} run(s) not recorded" if row["not_recorded"] else "")


def _nc_blocks(group: dict[str, Any]) -> list[Any]:
    rows = group["neural_cleanse"]
    if not rows:
        return []
    body = tuple(
        (
            "poisoned" if row["poisoned"] else "clean",
            row["precision"],
            str(row["runs"]),
            ", ".join(f"{k} ({v})" for k, v in row["profiles"].items()),
            _num(row["confirm_threshold"]),
            _confirmed_text(row),
            str(row["made_inconclusive"]),
            _flags_text(row["flags"]),
        )
        for row in rows
    )
    header = (
        "variant",
        "precision",
        "ok runs",
        "profile (runs)",
        "confirmation bar",
        "flags confirmed / flagged",
        "verdicts made inconclusive",
        "onnxruntime attack success of each flagged label (✓ confirmed)",
    )
    return [
        "Each label the MAD rule flagged, its reversed trigger's attack success on held-out "
        "images run on the deployed onnxruntime session (§4.1 step 2), before confirmation; a "
        "flag counts only at or above the bar. *not recorded*: runs from before the "
        "confirmation existed.",
        Table(header, body),
    ]


def _regime_blocks(group: dict[str, Any]) -> list[Any]:
    rows = group["regime"]
    if not rows:
        return []

    def fraction(value: Any) -> str:
        if not isinstance(value, int | float):
            return "not recorded"
        return f"{value:.3f}" + (" (majority: outside the regime)" if value >= 0.5 else "")

    body = tuple(
        (
            "poisoned",
            row["precision"],
            str(row["seed"]),
            fraction(row["target_poison_fraction"]),
            _num(row["ss_removed_fraction"], 3),
            _num(row["ss_poison_recall"], 3),
            str(row["ss_epsilon_source"] or "—"),
            str(row["ss_flagged"] if row["ss_flagged"] is not None else "—"),
            _num(row["ac_purity"], 3),
            _num(row["ac_recall"], 3),
            str(row["ac_flagged"] if row["ac_flagged"] is not None else "—"),
        )
        for row in rows
    )
    header = (
        "variant",
        "precision",
        "seed",
        "target-class poison fraction",
        "SS removed fraction",
        "SS poison recall",
        "SS ε",
        "SS flagged",
        "AC smaller-cluster purity",
        "AC smaller-cluster recall",
        "AC flagged",
    )
    return [
        "Per poisoned cell, from the training sample's ground truth: AC's size rule and SS's "
        "removal assume poison is a minority of its class (§4.2, §4.3), so a target class that "
        "is mostly poison tests them outside their regime. SS's verdict is this project's "
        "spectral-gap z-score rule, not the paper's method (which removes samples and states no "
        "alarm).",
        Table(header, body),
    ]


def _strip_blocks(group: dict[str, Any]) -> list[Any]:
    rows = group.get("strip") or []
    if not rows:
        return []
    body = tuple(
        (
            "poisoned" if row["poisoned"] else "clean",
            row["precision"],
            str(row["runs"]),
            ", ".join(f"{k} ({v})" for k, v in row["blends"].items()),
            *(_num(row[key], 3) for key in ("tpr_normal", "frr_normal")),
            *(_num(row[key], 3) for key in ("tpr_empirical", "frr_empirical")),
        )
        for row in rows
    )
    header = (
        "variant",
        "precision",
        "ok runs",
        "blend (runs)",
        "TPR, normal-fit threshold",
        "FRR, normal-fit threshold",
        "TPR, empirical threshold",
        "FRR, empirical threshold",
    )
    return [
        "STRIP's rates at both thresholds (§4.4: the authors' normal fit's 1% quantile and the "
        "empirical 1% quantile), means over the ok runs; the blend is `add_float` (the authors' "
        "unclipped sum) under the protocol. On clean controls the triggered inputs carry a "
        "trigger the model never learned.",
        Table(header, body),
    ]


def primary_sections(metrics: dict[str, Any]) -> list[Section]:
    """The "Primary metrics (protocol v2)" section of report.md/.html; every table's section
    title names the protocol version and the runs' commit (protocol §1)."""
    sections = [
        Section(f"Primary metrics (protocol v{metrics['protocol_version']})", 2, _intro(metrics))
    ]
    if not metrics["groups"]:
        sections[0].blocks.append("No finished cell in the store.")
    for group in metrics["groups"]:
        key = (group["dataset"], group["model"], group["attack"])
        mark = stamp(metrics)
        sections.append(
            Section(f"Primary metrics: {group_label(key)} ({mark})", 3, _group_blocks(group))
        )
        for title, blocks in (
            ("Fine-Pruning: removal and its no-fine-tune control", _repair_blocks(group)),
            ("Neural Cleanse: profile and onnxruntime confirmation", _nc_blocks(group)),
            ("STRIP: both thresholds and the blend", _strip_blocks(group)),
            (
                "Activation Clustering and Spectral Signatures: operating regime",
                _regime_blocks(group),
            ),
        ):
            if blocks:
                sections.append(Section(f"{title} ({mark})", 4, blocks))
    return sections
