"""``blindspots`` command line: the whole pipeline (``demo``, ``run``) or one step at a time.

Every user-caused problem surfaces as ``blindspots: error: <one line>`` and exit status 2; a
traceback means a bug in blindspots, not in the input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from harness.cli.qcb import add_commands as add_qcb_commands
from harness.cli.sweep import add_commands as add_sweep_commands
from harness.core.errors import BlindspotsError
from harness.core.kernel_profiles import DEFAULT_PROFILE, PROFILES

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Handler:
    """A command handler imported when its command runs: ``blindspots --help`` and ``list``
    then start without torch or onnxruntime (each command group loads only its floors)."""

    def handler(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    handler.__name__ = name
    return handler


def _positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _kernel_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PROFILE) -> None:
    parser.add_argument(
        "--int8-kernels",
        choices=PROFILES,
        default=default,
        help="INT8 kernel profile of every onnxruntime session: 'exact' (int32 accumulation, the "
        "same numbers on any x86 CPU) or 'host' (this CPU's default kernels, which saturate on "
        "x86 without VNNI)" + ("" if default is None else f"; default: {default}"),
    )


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="digits", help="registered dataset name (default: digits)"
    )
    parser.add_argument("--data-root", default=None, help="dataset location (file or folder)")


def _preprocessing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mean", type=float, nargs="+", default=None, help="per-channel mean (after --scale)"
    )
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std")
    parser.add_argument(
        "--scale", type=float, default=None, help="pixel multiplier (default 1/255; 1 for 0..255)"
    )
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default=None)
    parser.add_argument("--channel-order", choices=("RGB", "BGR"), default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blindspots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="BadNet vs clean control at every precision, and the QCB vignette (digits)"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--full",
        action="store_true",
        help="every defense at its full demo budget and the QCB re-quantization table (minutes)",
    )
    _kernel_args(p)
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_demo"))

    p = sub.add_parser("run", help="run an experiment from a TOML/JSON config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", default=None, help="override the config's dataset")
    p.add_argument("--data-root", default=None, help="override the config's data_root")
    _kernel_args(p, default=None)
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_run"))

    p = sub.add_parser(
        "report", help="rebuild report.json / report.md / report.html / plots from a run folder"
    )
    p.add_argument("folder")
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_report"))

    p = sub.add_parser("train", help="train one (poisoned or --clean) model")
    _dataset_args(p)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--attack", default="badnet")
    p.add_argument("--attack-params", default=None, help="JSON, e.g. '{\"patch_size\": 3}'")
    p.add_argument("--clean", action="store_true", help="train the clean control instead")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_train"))

    p = sub.add_parser("export", help="export a checkpoint to ONNX with a parity check")
    _dataset_args(p)
    p.add_argument("--state", required=True, help="checkpoint from 'blindspots train'")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_export"))

    p = sub.add_parser("quantize", help="quantize an FP32 ONNX model to one precision")
    _dataset_args(p)
    p.add_argument("--model", required=True, help="FP32 ONNX file")
    p.add_argument("--precision", required=True)
    p.add_argument("--calibration-size", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        default=None,
        help='JSON recipe overrides, e.g. \'{"calibration_method": "entropy"}\'',
    )
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights, so u8×s8 pair sums cannot saturate int16 on CPUs without VNNI "
        "(recorded in the sidecar's recipe)",
    )
    _preprocessing_flags(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_quantize"))

    p = sub.add_parser("evaluate", help="clean accuracy / ASR (and defenses) of one ONNX model")
    _dataset_args(p)
    p.add_argument("--model", required=True, help="ONNX file to audit")
    p.add_argument("--reference", default=None, help="FP32 ONNX file for top-1 agreement")
    p.add_argument(
        "--attack",
        default=None,
        help="trigger to stamp (default: the attack in the model's metadata, else badnet)",
    )
    p.add_argument(
        "--attack-params",
        default=None,
        help="JSON; given with or without --attack, overrides the model's recorded attack",
    )
    p.add_argument("--defenses", nargs="*", default=None)
    p.add_argument(
        "--trained-on-dataset",
        action="store_true",
        help="the model was trained on this dataset's training split (enables AC / SS)",
    )
    _preprocessing_flags(p)
    _kernel_args(p)
    p.set_defaults(func=_lazy("harness.cli.steps", "cmd_evaluate"))

    p = sub.add_parser(
        "audit", help="audit a vendor's ONNX classifier as published (and its quantized copies)"
    )
    p.add_argument("model", help="the ONNX file to audit (read as untrusted, never modified)")
    _dataset_args(p)
    p.add_argument(
        "--defenses",
        nargs="*",
        default=None,
        help="default: NC, AC, SS, STRIP (on NC's reversed triggers), deployment_diff",
    )
    p.add_argument("--defense-params", default=None, help="JSON/TOML file of per-defense tables")
    p.add_argument(
        "--precisions",
        default="published",
        help="comma list: 'published' and/or precisions to build from a float model "
        "(e.g. published,int8-static,int4)",
    )
    p.add_argument(
        "--deployed",
        action="append",
        default=[],
        metavar="FILE",
        help="a quantized file the vendor ships beside the float MODEL (repeatable): checked "
        "against it with the deployment-differential check",
    )
    p.add_argument(
        "--budget",
        choices=("quick", "paper"),
        default="paper",
        help="'paper': the defenses' authors' settings (default); 'quick': NC's fast profile "
        "capped at 300 steps and STRIP on 100 clean inputs, for CI",
    )
    p.add_argument(
        "--fail-on",
        choices=("suspicious", "inconclusive", "never"),
        default="never",
        help="exit 1 on a suspicious verdict, 3 on an inconclusive/error one (with "
        "'inconclusive'); default 'never': exit 0 whatever the audit finds",
    )
    p.add_argument("--junit", default=None, metavar="FILE", help="write a JUnit XML summary")
    p.add_argument(
        "--model-family",
        default=None,
        metavar="NAME",
        help="the model's architecture as the project names it (e.g. small_cnn): each verdict "
        "is then read against the project's clean controls of that family, dataset and budget",
    )
    p.add_argument(
        "--controls",
        action="append",
        default=[],
        metavar="FILE",
        help="a clean-control reference made by tools/control_reference.py (repeatable), "
        "besides the packaged ones",
    )
    p.add_argument(
        "--trained-on-dataset",
        action="store_true",
        help="the model was trained on this dataset's training split (enables AC / SS)",
    )
    p.add_argument("--sample-size", type=_positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/audit")
    _preprocessing_flags(p)
    _kernel_args(p)
    p.set_defaults(func=_lazy("harness.cli.audit", "cmd_audit"))

    p = sub.add_parser(
        "kernels", help="measure whether this CPU's INT8 kernels saturate (host vs exact profile)"
    )
    p.set_defaults(func=_lazy("harness.cli.info", "cmd_kernels"))

    p = sub.add_parser("list", help="registered datasets, attacks, models, precisions, defenses")
    p.set_defaults(func=_lazy("harness.cli.info", "cmd_list"))
    add_qcb_commands(sub)
    add_sweep_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BlindspotsError as exc:
        print(f"blindspots: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blindspots: interrupted; finished cells are in results.jsonl", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
