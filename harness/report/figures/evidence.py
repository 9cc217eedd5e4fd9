"""The evidence behind each figure: per-cell arrays, the true trigger, each cell's panel state.

:mod:`harness.report.data` reads the store into the report; this module gathers, for one defense on
one group of cells, what its figure needs (:class:`harness.report.figures.model.Evidence`): the
cell's own arrays from ``arrays/<cell>.npz`` (a missing or damaged file is a warning and a panel
drawn without it, never a failed report), the stored verdict's state, and the attack's true trigger
rebuilt from the stored name and parameters through the attacks registry.
"""

from __future__ import annotations

import logging
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.attacks.base import ATTACKS, Attack, build_attack
from harness.core.errors import BlindspotsError, one_line
from harness.core.verdicts import record_verdict
from harness.report.figures.model import Evidence

logger = logging.getLogger(__name__)


def seed_order(seed: Any) -> tuple[int, Any]:
    """Sort key for seeds: integers by value, anything else after them by its text."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


class CellArrays:
    """Per-cell arrays, each ``arrays/<cell>.npz`` read once; a damaged file is a warning."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def of(self, run: dict[str, Any]) -> dict[str, np.ndarray]:
        relative = run.get("arrays")
        if not isinstance(relative, str) or not relative:
            return {}
        if relative not in self._cache:
            self._cache[relative] = self._load(self.folder / relative)
        return self._cache[relative]

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            logger.warning(f"{path} not found; its plots are drawn without it")
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            logger.warning(f"{path} is damaged ({one_line(exc)}); its plots are drawn without it")
        return {}


def rebuild_attack(name: Any, params: dict[str, Any] | None) -> tuple[Attack | None, str]:
    """The attack a run used, from its stored name and parameters; ``(None, why)`` if it can't be.

    An attack that wraps another's trigger (the QCB runs store ``"trigger": "badnet"`` beside
    BadNet's parameters) is rebuilt as that trigger's attack.
    """
    params = dict(params or {})
    try:
        return build_attack(str(name), params), ""
    except BlindspotsError as exc:
        inner = params.get("trigger")
        if not (isinstance(inner, str) and inner in ATTACKS):
            return None, str(exc)
    try:
        fields = ATTACKS.get(inner).Params.model_fields
        return build_attack(inner, {k: v for k, v in params.items() if k in fields}), ""
    except BlindspotsError as exc:
        return None, str(exc)


def true_trigger(attack: Attack, shape: tuple[int, int, int]) -> np.ndarray:
    """The trigger as ``mask·pattern`` (H, W, C) in 0..255, comparable with a reversed one.

    Patch attacks give their mask and pattern; any other attack is stamped on a black image.
    """
    if hasattr(attack, "trigger_mask_and_pattern"):
        mask, pattern = attack.trigger_mask_and_pattern(shape)
        return mask[..., None] * pattern.astype(np.float32)
    blank = np.zeros((1, *shape), dtype=np.uint8)
    return attack.apply_for_test(blank)[0].astype(np.float32)


def cell_state(result: dict[str, Any] | None) -> tuple[str, str]:
    """A stored defense result's panel state and its reason (see :class:`Evidence`)."""
    if result is None:
        return "no_result", "this defense did not run on the cell"
    verdict = record_verdict(result)
    if verdict is None:
        status = str(result.get("status") or "error")
        return status, str(result.get("reason") or "")
    if verdict == "inconclusive":
        return "inconclusive", str(result.get("verdict_reason") or "no reason recorded")
    return "ok", ""


def evidence_seed(runs: list[dict[str, Any]]) -> int | None:
    """The seed whose cells the per-defense figures show: the one with the most finished cells
    in the group (the smallest among ties).

    A seed whose cells failed has fewer of them in the store; showing it would fill a figure
    with "not run" panels while another seed has the evidence.
    """
    counts: dict[Any, int] = defaultdict(int)
    for run in runs:
        counts[run["seed"]] += 1
    if not counts:
        return None
    return min(counts, key=lambda seed: (-counts[seed], seed_order(seed)))


def defense_evidence(
    runs: list[dict[str, Any]], defense: str, arrays: CellArrays
) -> list[Evidence]:
    """Evidence of one defense on every cell of the chosen seed of one group."""
    seed = evidence_seed(runs)
    evidence = []
    for run in (r for r in runs if r["seed"] == seed):
        result = run.get("defenses", {}).get(defense)
        state, note = cell_state(result)
        prefix = f"{defense}."
        own = {k[len(prefix) :]: v for k, v in arrays.of(run).items() if k.startswith(prefix)}
        attack, why = rebuild_attack(run.get("attack"), run.get("attack_params"))
        target = None
        if run["poisoned"]:
            target = (
                attack.target_label
                if attack
                else (run.get("attack_params") or {}).get("target_label")
            )
        trigger, trigger_note = None, why
        masks, patterns = own.get("masks"), own.get("patterns")
        if run["poisoned"] and attack is not None and masks is not None and patterns is not None:
            shape = (int(masks.shape[1]), int(masks.shape[2]), int(patterns.shape[-1]))
            try:
                trigger = true_trigger(attack, shape)
            except BlindspotsError as exc:
                trigger_note = str(exc)
        evidence.append(
            Evidence(
                precision=run["precision"],
                poisoned=bool(run["poisoned"]),
                seed=seed,
                state=state,
                note=note,
                result=result or {},
                arrays=own,
                target=target,
                true_trigger=trigger,
                trigger_note=trigger_note,
            )
        )
    return evidence
