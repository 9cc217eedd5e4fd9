"""Choose a QCB recovery budget on a development seed, before any reported seed runs.

The QCB's ``[qcb]`` settings (boost units, recovery epochs, learning rate, recovery images)
trade clean accuracy against INT8 attack success, and the right trade differs per dataset and
model. Tuning them on what a table then reports would be tuning on the test set, so this bench
runs a list of settings on one *development* seed that no table uses and scores them on
*held-out* test images: the ``eval_limit`` images after the ones the QCB table is scored on.
It first writes a smaller .npz (``--data``) with the run's own stratified ``train_limit``
training subset and those held-out test images (parallel runs, or a machine the full file
cannot be sent to, then read only that), runs the settings in parallel processes, each on
onnxruntime sessions (FP32 and INT8-static only; no defenses, no re-quantization), and prints
one row per setting with whether it passes a rule fixed beforehand: clean accuracy within
``--max-drop`` of the clean control on both artifacts, INT8-static ASR ≥ ``--min-asr`` and
FP32 ASR ≤ ``--max-fp32-asr`` (dormant in FP32, or it is no QCB). Every setting retrains the
seed's clean control (the same training, so the same numbers in every row). A setting's folder
is named by a hash of the setting and the seed, so a changed list never reuses another's runs.

Usage: ``python -m bench.qcb.qcb_budget [--config configs/qcb/qcb-gtsrb.toml] [--seed 11]
[--settings settings.json] [--data runs/qcb-budget/data.npz] [--parallel 6] [--threads 2]
[--out runs/qcb-budget]``; ``settings.json`` is a list of ``[qcb]`` overrides (default: the 18
settings of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from harness.pipeline.store import ResultStore
from harness.qcb.pipeline import QCBConfig, load_qcb_config, qcb_dataset, run_qcb

ALL_IMAGES = None
SETTINGS: list[dict[str, Any]] = [
    {"boost_units": 4, "recover_epochs": 1, "lr": 1e-3, "max_train_images": 6000},
    {"boost_units": 4, "recover_epochs": 3, "lr": 1e-3, "max_train_images": 6000},
    {"boost_units": 4, "recover_epochs": 3, "lr": 3e-3, "max_train_images": 6000},
    {"boost_units": 4, "recover_epochs": 2, "lr": 1e-3},
    {"boost_units": 4, "recover_epochs": 4, "lr": 1e-3},
    {"boost_units": 4, "recover_epochs": 6, "lr": 1e-3},
    {"boost_units": 2, "recover_epochs": 3, "lr": 1e-3},
    {"boost_units": 2, "recover_epochs": 4, "lr": 1e-3, "kappa": 6.0},
    {"boost_units": 3, "recover_epochs": 4, "lr": 1e-3},
    {"boost_units": 3, "recover_epochs": 4, "lr": 1e-3, "threshold": 0.3},
    {"boost_units": 3, "recover_epochs": 6, "lr": 1e-3},
    {"boost_units": 4, "recover_epochs": 4, "lr": 5e-4},
    {"boost_units": 5, "recover_epochs": 3, "lr": 5e-4},
    {"boost_units": 5, "recover_epochs": 4, "lr": 5e-4},
    {"boost_units": 6, "recover_epochs": 4, "lr": 5e-4},
    {"boost_units": 6, "recover_epochs": 3, "lr": 5e-4},
    {"boost_units": 6, "recover_epochs": 4, "lr": 3e-4},
    {"boost_units": 8, "recover_epochs": 4, "lr": 5e-4},
]
"""The settings measured on GTSRB (seed 11); ``max_train_images`` absent: all training images."""


def write_development_data(config: QCBConfig, path: Path) -> None:
    """The QCB run's own training subset, and test images the QCB table is not scored on."""
    data = qcb_dataset(config)
    if config.eval_limit is None or 2 * config.eval_limit > len(data.x_test):
        raise SystemExit(
            f"need eval_limit set and 2 x eval_limit <= {len(data.x_test)} test images, so that "
            "development runs are scored on images the reported table does not use"
        )
    held_out = slice(config.eval_limit, 2 * config.eval_limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        x_train=data.x_train,
        y_train=data.y_train,
        x_test=data.x_test[held_out],
        y_test=data.y_test[held_out],
    )


def folder_name(seed: int, setting: dict[str, Any]) -> str:
    """``s<seed>-<hash of the setting>``: a changed setting never reuses another's results."""
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    return f"s{seed}-{digest}"


def development_config(base: QCBConfig, seed: int, setting: dict[str, Any]) -> QCBConfig:
    """The base config on one seed, scored on FP32 and INT8-static only, with ``setting``."""
    return base.model_copy(
        update={
            "seeds": [seed],
            "precisions": ["fp32", "int8-static"],
            "defenses": [],
            "requantize": False,
            "qcb": {**base.qcb, "max_train_images": ALL_IMAGES, **setting},
        }
    )


def _run(job: tuple[QCBConfig, str]) -> list[dict[str, Any]]:
    config, out = job
    run_qcb(config, out, log=lambda message: None)
    return ResultStore(out).records()


def score(
    records: list[dict[str, Any]], max_drop: float, min_asr: float, max_fp32_asr: float
) -> dict[str, Any]:
    """Accuracy and ASR per artifact of the QCB and of the clean control, and the rule's answer."""
    got = {(r["poisoned"], r["precision"]): r for r in records}
    row = {
        "control_acc": got[(False, "fp32")]["clean_acc"],
        "acc_fp32": got[(True, "fp32")]["clean_acc"],
        "acc_int8": got[(True, "int8-static")]["clean_acc"],
        "asr_fp32": got[(True, "fp32")]["asr"],
        "asr_int8": got[(True, "int8-static")]["asr"],
    }
    row["passes"] = (
        row["acc_fp32"] >= row["control_acc"] - max_drop
        and row["acc_int8"] >= got[(False, "int8-static")]["clean_acc"] - max_drop
        and row["asr_int8"] >= min_asr
        and row["asr_fp32"] <= max_fp32_asr
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/qcb/qcb-gtsrb.toml"))
    parser.add_argument("--seed", type=int, default=11, help="a seed no reported table uses")
    parser.add_argument("--settings", type=Path, help="JSON list of [qcb] overrides")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("runs/qcb-budget/data.npz"),
        help="where to write the development images (rewritten each run)",
    )
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads per run")
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--min-asr", type=float, default=0.9)
    parser.add_argument("--max-fp32-asr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/qcb-budget"))
    args = parser.parse_args(argv)
    base = load_qcb_config(args.config).model_copy(update={"threads": args.threads})
    write_development_data(base, args.data)
    base = base.model_copy(update={"data_root": str(args.data), "train_limit": None})
    settings = json.loads(args.settings.read_text()) if args.settings else SETTINGS
    jobs = [
        (
            development_config(base, args.seed, setting),
            str(args.out / folder_name(args.seed, setting)),
        )
        for setting in settings
    ]
    with ProcessPoolExecutor(args.parallel) as pool:
        results = list(pool.map(_run, jobs))
    print("| setting | QCB acc FP32 / INT8 | control acc | FP32 ASR | INT8 ASR | passes |")
    print("|---|---|---|---|---|---|")
    for setting, records in zip(settings, results, strict=True):
        row = score(records, args.max_drop, args.min_asr, args.max_fp32_asr)
        print(
            f"| {json.dumps(setting)} | {row['acc_fp32']:.4f} / {row['acc_int8']:.4f} | "
            f"{row['control_acc']:.4f} | {row['asr_fp32']:.4f} | {row['asr_int8']:.4f} | "
            f"{'yes' if row['passes'] else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
