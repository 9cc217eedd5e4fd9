"""The attack record a model carries (harness/artifacts/attack_metadata.py): written from the
checkpoint's metadata, read back, and refused in plain words when it is malformed."""

from __future__ import annotations

import json

import pytest

from harness.artifacts.attack_metadata import ATTACK_KEY, StoredAttack, attack_entries, read_attack
from harness.artifacts.preprocessing import Preprocessing
from harness.core.errors import ModelError


def test_round_trip_from_checkpoint_meta():
    meta = {"attack": {"name": "badnet", "params": {"patch_size": 2}}, "poisoned": True}
    assert read_attack(attack_entries(meta)) == StoredAttack("badnet", {"patch_size": 2}, True)
    assert attack_entries({"poisoned": False}) == {}
    assert read_attack({}) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[1, 2]", "must be a JSON object with 'name' and 'params', got a JSON list"),
        ("{oops", "is not JSON"),
        ('{"params": {}}', "names no attack"),
        ('{"name": "badnet", "params": [3]}', "'params' must be an object"),
    ],
)
def test_malformed_attack_records_are_plain_errors(value, words):
    with pytest.raises(ModelError, match=words) as caught:
        read_attack({ATTACK_KEY: value})
    assert ATTACK_KEY in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[0.5, 0.25]", "must be a JSON object with 'mean' and 'std', got a JSON list"),
        ('{"mean": [0.5]}', "lacks std"),
        ('{"mean": 0.5, "std": [1]}', "'mean' must be a list of numbers"),
    ],
)
def test_malformed_preprocessing_metadata_is_named_not_pythons_error(value, words):
    with pytest.raises(ModelError, match=words) as caught:
        Preprocessing.from_json(value)
    assert "list indices" not in str(caught.value)


def test_attack_entries_are_json_strings_onnx_metadata_accepts():
    entries = attack_entries({"attack": {"name": "blended", "params": {"alpha": 0.1}}})
    assert json.loads(entries[ATTACK_KEY])["name"] == "blended"
