"""A finished QCB run, scored again on test images its table did not use.

``blindspots qcb run`` scores each artifact on the first ``eval_limit`` test images. Where the
QCB's settings were chosen by looking at scores on those same images (even on another seed),
the table's numbers are not an unbiased estimate; this bench re-scores every artifact of every
seed on the test images after them, which no choice has seen, with the same metrics
(:func:`harness.qcb.requantize.evaluate_file`: accuracy and ASR under both INT8 kernel profiles).

Usage: ``python -m bench.qcb.qcb_heldout runs/qcb-gtsrb [--threads 2]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.attacks.base import build_attack
from harness.core.errors import BlindspotsError
from harness.pipeline.evaluate import EvaluationImages
from harness.qcb.pipeline import QCBConfig, load_qcb_config, qcb_dataset
from harness.qcb.requantize import evaluate_file

KINDS = {"qcb": "QCB", "clean": "clean control"}


def held_out_sets(config: QCBConfig) -> EvaluationImages:
    """The test images after the first ``eval_limit`` ones, and their triggered copies."""
    if config.eval_limit is None:
        raise SystemExit("this run scored every test image: none is held out")
    data = qcb_dataset(config)
    x_test, y_test = data.x_test[config.eval_limit :], data.y_test[config.eval_limit :]
    if not len(x_test):
        raise SystemExit(f"eval_limit {config.eval_limit} leaves no test image held out")
    attack = build_attack(config.attack, config.attack_params)
    triggered, _ = attack.triggered_test_set(x_test, y_test)
    return EvaluationImages(x_test, y_test, triggered, attack.target_label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `blindspots qcb run` output folder")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        config = load_qcb_config(args.run / "qcb_config.json")
    except BlindspotsError as exc:  # a bad folder is one line, as in the CLI
        raise SystemExit(f"error: {exc}") from None
    sets = held_out_sets(config)
    print(
        f"{len(sets.y)} held-out test images (after the first {config.eval_limit}), "
        f"{len(sets.triggered)} triggered"
    )
    print("| seed | model | artifact | acc exact | ASR exact | acc host | ASR host |")
    print("|---|---|---|---|---|---|---|")
    for seed in config.seeds:
        for folder, kind in KINDS.items():
            for precision in config.precisions:
                path = args.run / "artifacts" / f"s{seed}" / folder / f"{precision}.onnx"
                if not path.is_file():
                    continue
                got = evaluate_file(path, sets, args.threads)
                exact, host = got["exact"], got["host"]
                print(
                    f"| {seed} | {kind} | {precision} | {exact['clean_acc']:.4f} | "
                    f"{exact['asr']:.4f} | {host['clean_acc']:.4f} | {host['asr']:.4f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
