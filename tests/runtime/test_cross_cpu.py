"""bench.runtime.cross_cpu: a second machine's record is compared with this one's, profile by profile."""

from __future__ import annotations

import json

import numpy as np

from bench.runtime.cross_cpu import compare, fingerprint, main


def test_a_record_matches_itself_and_a_changed_one_is_reported(digits_world, tmp_path, capsys):
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, digits_world.x_test[:64])
    model = digits_world.poisoned["int8-static"]
    reference = tmp_path / "reference.json"
    main([str(model), str(pixels), "--json", str(reference)])
    main(
        [
            str(model),
            str(pixels),
            "--json",
            str(tmp_path / "here.json"),
            "--reference",
            str(reference),
        ]
    )
    out = capsys.readouterr().out
    # the exact profile is the same arithmetic on any x86 CPU, and so the same logits here
    assert "exact: bit-identical to reference exact: True; top-1 agreement 1.0000" in out

    here = fingerprint(model, digits_world.x_test[:64])
    other = json.loads(reference.read_text())
    other["exact"]["sha256"] = "0" * 64  # another CPU's logits that differ somewhere
    other["exact"]["pred"][:16] = [(p + 1) % 10 for p in other["exact"]["pred"][:16]]
    lines = compare(here, other)
    assert lines[0] == "exact: bit-identical to reference exact: False; top-1 agreement 0.7500"
