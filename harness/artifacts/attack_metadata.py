"""The attack that made a model, carried by the model itself.

A checkpoint's metadata names the attack (name and parameters) its training set was poisoned
with; the ONNX export copies it into ``metadata_props`` under :data:`ATTACK_KEY`, and the
quantizers keep every metadata entry, so INT8/INT4 files carry it too. ``blindspots evaluate``
then stamps the trigger the model was actually trained on: without this, evaluating a model
trained with a 2×2 patch used the command line's default 3×3 patch and reported an ASR of
0.027 for a backdoor with ASR 1.0.

Plain data only (no attack classes): this floor sits below ``harness.attacks``, and the caller
builds the attack from what :func:`read_attack` returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.core.errors import ModelError

ATTACK_KEY = "blindspots.attack"
MODEL_META_ATTR = "blindspots_meta"
"""Attribute under which ``save_state``/``load_model`` leave the checkpoint metadata on the torch
module, so that every export of that module (the runner's, the QCB pipeline's, ``blindspots
export``) stamps the attack without each call site passing it along."""


@dataclass(frozen=True)
class StoredAttack:
    """What a model's metadata says about the attack behind it."""

    name: str
    params: dict[str, Any]
    poisoned: bool | None
    """True: trained on the poisoned set; False: the clean control of that attack."""


def attack_entries(meta: Mapping[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props`` entries for a checkpoint's metadata (empty without an attack)."""
    attack = meta.get("attack")
    if not isinstance(attack, Mapping) or "name" not in attack:
        return {}
    record = {
        "name": attack["name"],
        "params": dict(attack.get("params") or {}),
        "poisoned": meta.get("poisoned"),
    }
    return {ATTACK_KEY: json.dumps(record, sort_keys=True)}


def read_attack(metadata: Mapping[str, str]) -> StoredAttack | None:
    """The attack recorded in a model's ``metadata_props``; None when there is none.

    A record that is there but unreadable is an error in plain words, never a guess.
    """
    text = metadata.get(ATTACK_KEY)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"model metadata '{ATTACK_KEY}' is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(
            f"model metadata '{ATTACK_KEY}' must be a JSON object with 'name' and 'params', "
            f"got a JSON {type(raw).__name__}"
        )
    name, params, poisoned = raw.get("name"), raw.get("params", {}), raw.get("poisoned")
    if not isinstance(name, str) or not name:
        raise ModelError(f"model metadata '{ATTACK_KEY}' names no attack ('name' missing)")
    if not isinstance(params, dict):
        raise ModelError(f"model metadata '{ATTACK_KEY}': 'params' must be an object")
    if poisoned is not None and not isinstance(poisoned, bool):
        raise ModelError(f"model metadata '{ATTACK_KEY}': 'poisoned' must be true or false")
    return StoredAttack(name=name, params=params, poisoned=poisoned)
