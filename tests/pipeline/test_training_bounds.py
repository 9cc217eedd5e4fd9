"""Training settings are checked when they are read, before any work: an infinite or absurd
learning rate used to be accepted and surface minutes later as an export parity error."""

from __future__ import annotations

import pytest

from harness.cli import main


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("lr = inf", "'training.lr': Input should be a finite number"),
        ("lr = nan", "'training.lr'"),
        ("lr = 1e30", "'training.lr': Input should be less than or equal to 10"),
        ("epochs = 0", "'training.epochs'"),
    ],
)
def test_bad_training_settings_in_a_config_are_one_line_errors(tmp_path, capsys, line, words):
    config = tmp_path / "bad.toml"
    config.write_text(f"[training]\n{line}\n")
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blindspots: error:") and words in err and "\n" not in err
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "1e30"], ["--epochs", "100000"]])
def test_bad_training_flags_are_one_line_errors(tmp_path, capsys, flag):
    assert main(["train", *flag, "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blindspots: error: invalid training option") and "\n" not in err
    assert not (tmp_path / "m.pt").exists()
