"""``blindspots qcb run | implant``: the quantization-conditioned backdoor (harness.qcb).

Handlers import the QCB floor when they run, so building the parser stays light.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _print(message: str) -> None:
    print(message, flush=True)


def cmd_qcb_run(args: argparse.Namespace) -> int:
    from harness.qcb.pipeline import load_qcb_config, run_qcb

    overrides: dict[str, Any] = {"data_root": args.data_root}
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.no_requantize:
        overrides["requantize"] = False
    config = load_qcb_config(args.config, overrides)
    if args.label_workers is None:
        run_qcb(config, args.out, log=_print)
    else:
        from harness.pipeline.executors import make_executor

        # Neural Cleanse's labels fan out over local processes: the serial scan's result, sooner
        with make_executor("processes", args.label_workers, threads=1) as executor:
            run_qcb(config, args.out, log=_print, label_map=executor.label_map())
    print((Path(args.out) / "qcb.md").read_text())
    print(
        f"wrote {Path(args.out) / 'qcb.md'}, {Path(args.out) / 'qcb.json'}, report.md and report.html"
    )
    return 0


def cmd_qcb_implant(args: argparse.Namespace) -> int:
    from harness.artifacts.preprocessing import Preprocessing
    from harness.attacks.base import build_attack
    from harness.data.base import load_dataset
    from harness.pipeline.config import parse_json_object
    from harness.qcb.attack import QCBParams, implant
    from harness.training.loop import load_model, save_state

    model, meta = load_model(args.state)
    data = load_dataset(args.dataset, args.data_root)
    params = parse_json_object(args.params, "--params")
    attack = build_attack(args.attack, parse_json_object(args.attack_params, "--attack-params"))
    attack.validate_for(data.image_shape, data.num_classes)
    result = implant(model, data.x_train, data.y_train, attack,
                     Preprocessing.from_json(meta["preprocessing"]), QCBParams(**params), args.seed)  # fmt: skip
    save_state(result.model, args.out, {**meta, "poisoned": True, "attack": attack.describe()})
    print(json.dumps(result.measurements["mirror"], indent=2))
    print(f"wrote {args.out}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``blindspots qcb run`` and ``blindspots qcb implant``."""
    qcb = subparsers.add_parser("qcb", help="quantization-conditioned backdoors: build and audit")
    sub = qcb.add_subparsers(dest="qcb_command", required=True)
    p = sub.add_parser("run", help="QCB vs clean control, audited on FP32 and deployed artifacts")
    p.add_argument("--config", required=True, help="TOML/JSON, e.g. configs/qcb/qcb-digits.toml")
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=None, help="override the config's data_root")
    p.add_argument("--seeds", default=None, help="comma list overriding the config's seeds")
    p.add_argument(
        "--no-requantize",
        action="store_true",
        help="skip the re-quantization table (the part of a seed that takes longest; the "
        "cells and verdicts do not depend on it)",
    )
    p.add_argument(
        "--label-workers",
        type=int,
        default=None,
        metavar="N",
        help="run Neural Cleanse's per-label searches on N local worker processes (the same "
        "result as in process)",
    )
    p.set_defaults(func=cmd_qcb_run)
    p = sub.add_parser("implant", help="implant a QCB into a trained checkpoint")
    p.add_argument("--state", required=True, help="checkpoint from 'blindspots train --clean'")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--attack", default="badnet")
    p.add_argument(
        "--attack-params",
        default='{"patch_size": 3, "pattern": "checkerboard", "margin": 0, "target_label": 0}',
    )
    p.add_argument("--params", default=None, help="JSON QCB parameters, e.g. '{\"kappa\": 6}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.set_defaults(func=cmd_qcb_implant)
