"""The command line: each step on its own, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json

import pytest

from harness.cli.app import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("blindspots: error: ")
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--dataset", "cifar", "--out", "x.pt"], "did you mean 'cifar10'"),
        (
            ["train", "--dataset", "npz", "--data-root", "nowhere.npz", "--out", "x.pt"],
            "nowhere.npz",
        ),
        (
            ["train", "--attack", "badnett", "--epochs", "1", "--out", "x.pt"],
            "did you mean 'badnet'",
        ),
        (
            ["train", "--attack-params", "{bad json", "--epochs", "1", "--out", "x.pt"],
            "--attack-params is not valid JSON",
        ),
        (["train", "--epochs", "0", "--out", "x.pt"], "epochs"),
        (["run", "--config", "missing.toml", "--out", "o"], "config file not found: missing.toml"),
        (["evaluate", "--model", "missing.onnx"], "missing.onnx: model file not found"),
        (["report", "empty"], "no results.jsonl in empty"),
        (
            ["export", "--state", "missing.pt", "--out", "m.onnx"],
            "model file not found: missing.pt",
        ),
        (
            ["quantize", "--model", "missing.onnx", "--precision", "int9", "--out", "q.onnx"],
            "unknown precision 'int9'",
        ),
    ],
)
def test_bad_input_gives_one_line_error(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(argv) == 2
    assert expected in _error_line(capsys)


def test_config_typos_and_bad_values_are_named(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('dataset = "digits"\nprecisons = ["fp32"]\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown option 'precisons'; did you mean 'precisions'?" in _error_line(capsys)
    config.write_text('defenses = ["stirp"]\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown defense 'stirp'; did you mean 'strip'?" in _error_line(capsys)
    config.write_text("[training]\nepochs = -1\n")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "training.epochs" in _error_line(capsys)


def test_config_problems_are_caught_before_any_training(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text("[1, 2]")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "must be a table/object" in _error_line(capsys)
    config.write_text('{"defense_params": {"strip": {"n_overlay": 5}}}')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown strip parameter 'n_overlay'; did you mean 'n_overlays'?" in _error_line(capsys)
    assert not (tmp_path / "o" / "artifacts").exists()  # nothing was trained


def test_a_model_of_another_input_shape_gives_a_one_line_error(digits_world, capsys):
    # the digits model expects 8x8x1; ask it about 32x32x1 images via explicit preprocessing
    from harness.core.errors import ModelError
    from harness.runtime.adapter import RuntimeAdapter

    adapter = RuntimeAdapter.from_path(digits_world.poisoned["int8-static"])
    import numpy as np

    try:
        adapter.logits(np.zeros((2, 32, 32, 1), np.uint8))
    except ModelError as exc:
        assert "rejected input of shape [2, 1, 32, 32]" in str(exc)
        assert "\n" not in str(exc)
    else:
        raise AssertionError("a wrong input shape must raise ModelError")


def test_list_names_every_registered_plugin(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "digits",
        "gtsrb",
        "badnet",
        "blended",
        "cifar_cnn",
        "int4",
        "int8-static",
        "strip",
        "neural_cleanse",
    ):
        assert name in out


def test_step_by_step_commands_chain(tmp_path, capsys):
    state, onnx_path, q_path = tmp_path / "m.pt", tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    assert (
        main(
            [
                "train",
                "--epochs",
                "12",
                "--batch-size",
                "64",
                "--attack-params",
                '{"patch_size": 2, "margin": 0}',  # not evaluate's default trigger (3x3, margin 1)
                "--out",
                str(state),
            ]
        )
        == 0
    )
    assert main(["export", "--state", str(state), "--out", str(onnx_path)]) == 0
    exported = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert exported["argmax_agreement"] == 1.0
    assert (
        main(
            [
                "quantize",
                "--model",
                str(onnx_path),
                "--precision",
                "int8-static",
                "--calibration-size",
                "128",
                "--out",
                str(q_path),
            ]
        )
        == 0
    )
    artifact = json.loads(capsys.readouterr().out)
    assert artifact["precision"] == "int8-static"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(q_path),
                "--reference",
                str(onnx_path),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "int8-static"
    assert result["clean_acc"] > 0.85
    # the trigger the model was trained with travelled checkpoint -> ONNX -> INT8 file
    assert result["attack"]["from"] == "model metadata"
    assert result["attack"]["params"]["patch_size"] == 2
    assert result["asr"] > 0.85
    assert result["agreement_fp32"] > 0.95
    # measured as a runner cell is (evaluate_artifact): the cell's counts and kernels come along
    assert result["n_test"] > result["n_triggered"] > 0 and "profile" in result["kernels"]
    assert "defenses" not in result  # none asked for
    # told otherwise, evaluate stamps what it is told
    assert main(["evaluate", "--model", str(q_path), "--attack-params", '{"patch_size": 3}']) == 0
    told = json.loads(capsys.readouterr().out)
    assert told["attack"]["from"] == "command line" and told["attack"]["params"]["patch_size"] == 3
