"""``blindspots`` command line: the whole pipeline (``demo``, ``run``) or one step at a time.

Every user-caused problem surfaces as ``blindspots: error: <one line>`` and exit status 2; a
traceback means a bug in blindspots, not in the input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from defenses.base import DEFENSES, DefenseData, build_defense
from exporters.onnx_export import export_onnx
from exporters.quantizers import PRECISIONS, quantize
from exporters.recipes import resolve_recipe
from harness.attacks.base import ATTACKS, build_attack
from harness.audit import (
    PUBLISHED,
    AuditRequest,
    open_vendor_model,
    run_audit,
    vendor_adapter,
    verdict_rows,
)
from harness.config import build_config, load_config, parse_json_object
from harness.data.base import DATASETS, load_dataset
from harness.errors import BlindspotsError
from harness.intake import IntakeOverrides, check_num_classes
from harness.kernels import DEFAULT_PROFILE, PROFILES, probe_host, profile_record
from harness.metrics import accuracy, agreement, attack_success_rate
from harness.model_safety import load_untrusted
from harness.models import MODELS
from harness.preprocessing import Preprocessing
from harness.qcb_cli import add_commands as add_qcb_commands
from harness.report import write_report
from harness.runner import run_experiment
from harness.sampling import stable_seed
from harness.sanity import check_outputs, raise_on_errors
from harness.sweep_cli import add_commands as add_sweep_commands
from harness.training import (
    TrainConfig,
    checkpoint_meta,
    load_model,
    save_state,
    train_model,
)

DEMO_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    # BadNet's classic 10% all-to-one poisoning with a 2x2 white corner patch: small next to an
    # 8x8 digit, the regime Neural Cleanse is designed for. (The target class is then about half
    # poison; configs/gtsrb_badnet.toml covers the low-rate regime AC and SS assume.)
    "attack_params": {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 30, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
    "threads": 1,
    "calibration_size": 256,
    "defense_clean_size": 225,
    "defense_params": {
        "neural_cleanse": {"steps": 400, "batch_size": 32, "n_samples": 256, "torch_threads": 1},
        "strip": {"n_overlays": 50, "n_test": 100},
    },
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def cmd_demo(args: argparse.Namespace) -> int:
    config = build_config({**DEMO_CONFIG, "int8_kernels": args.int8_kernels}, "demo config")
    started = time.perf_counter()
    run_experiment(config, args.out, log=_log)
    paths = write_report(args.out)
    _log(f"demo finished in {time.perf_counter() - started:.0f}s")
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['html']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"data_root": args.data_root, "int8_kernels": args.int8_kernels}
    if args.dataset:
        overrides["dataset"] = args.dataset
    config = load_config(args.config, overrides)
    run_experiment(config, args.out, log=_log)
    paths = write_report(args.out)
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['html']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not (folder / "results.jsonl").is_file():
        raise BlindspotsError(f"no results.jsonl in {folder}: nothing to report")
    paths = write_report(folder)
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['html']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:

    data = load_dataset(args.dataset, args.data_root)
    config = TrainConfig(
        model=args.model, epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size
    )
    preprocessing = Preprocessing.from_images(data.x_train)
    out = Path(args.out)
    x, y = data.x_train, data.y_train
    meta_extra: dict[str, Any] = {"poisoned": False}
    if not args.clean:
        attack = build_attack(args.attack, parse_json_object(args.attack_params, "--attack-params"))
        attack.validate_for(data.image_shape, data.num_classes)
        poisoned = attack.poison(x, y, np.random.default_rng(stable_seed("poison", args.seed)))
        x, y = poisoned.x, poisoned.y
        meta_extra = {"poisoned": True, "attack": attack.describe()}
    model = train_model(x, y, data.num_classes, preprocessing, config)
    meta = checkpoint_meta(
        config, data.num_classes, data.image_shape[2], preprocessing, **meta_extra
    )
    save_state(model, out, meta)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model, meta = load_model(args.state)
    preprocessing = Preprocessing.from_json(meta["preprocessing"])
    sample = load_dataset(args.dataset, args.data_root).x_test[:256]
    report = export_onnx(model, args.out, sample, preprocessing, opset=args.opset)
    print(report.model_dump_json(indent=2))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize one ONNX file as an integrator would: the file is read as untrusted first, and a
    vendor model without blindspots metadata gets its preprocessing from the flags."""
    overrides = parse_json_object(args.recipe, "--recipe")
    if args.reduce_range:
        overrides["reduce_range"] = True
    recipe = resolve_recipe(PRECISIONS.get(args.precision).default_recipe, overrides or None)
    stated = _intake_overrides(args)
    explicit = None
    if recipe.needs_calibration or stated != IntakeOverrides():  # preprocessing matters
        vendor = open_vendor_model(args.model, stated)  # also refuses hostile files in one line
        explicit = vendor.intake.preprocessing if stated != IntakeOverrides() else None
    else:
        load_untrusted(args.model)
    calibration = None
    if recipe.needs_calibration:
        x = load_dataset(args.dataset, args.data_root).x_train
        rng = np.random.default_rng(stable_seed("calibration", args.seed))  # as the runner draws
        calibration = x[
            np.sort(rng.choice(len(x), min(args.calibration_size, len(x)), replace=False))
        ]
    artifact = quantize(
        args.precision, args.model, args.out, calibration, overrides or None, explicit
    )
    print(artifact.model_dump_json(indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    overrides = _intake_overrides(args)
    data = load_dataset(args.dataset, args.data_root)
    vendor = open_vendor_model(args.model, overrides)
    check_num_classes(vendor.intake, data.num_classes)
    adapter = vendor_adapter(vendor, args.int8_kernels)
    raise_on_errors(check_outputs(adapter.logits(data.x_test), data.y_test))
    attack = build_attack(args.attack, parse_json_object(args.attack_params, "--attack-params"))
    pred = adapter.predict(data.x_test)
    triggered, _ = attack.triggered_test_set(data.x_test, data.y_test)
    result: dict[str, Any] = {
        "model": str(args.model),
        "precision": adapter.precision,
        "clean_acc": accuracy(pred, data.y_test),
        "asr": attack_success_rate(adapter.predict(triggered), attack.target_label),
        "layers": adapter.layers,
        "kernels": profile_record(args.int8_kernels),
    }
    if args.reference:
        ref = vendor_adapter(open_vendor_model(args.reference, overrides), args.int8_kernels)
        result["agreement_fp32"] = agreement(pred, ref.predict(data.x_test))
    if args.defenses:
        n = min(200, len(data.x_test) // 2)
        data_for_defenses = DefenseData(
            num_classes=data.num_classes,
            clean_x=data.x_test[:n],
            clean_y=data.y_test[:n],
            # AC / SS analyse the data the model was trained on; only the user knows that it
            # was this dataset's training split (otherwise they report not_applicable).
            train_x=data.x_train if args.trained_on_dataset else None,
            train_y=data.y_train if args.trained_on_dataset else None,
            triggered_x=triggered[n : 2 * n],
            target_label=None,
            poison_rate=attack.poison_rate,
        )
        result["defenses"] = {}
        for name in args.defenses:
            res = build_defense(name).run(
                adapter, data_for_defenses, np.random.default_rng(stable_seed("defense", name, 0))
            )
            result["defenses"][name] = json.loads(res.model_dump_json())
    print(json.dumps(result, indent=2))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    """What this CPU's INT8 kernels compute, measured (see harness.kernels)."""
    host = probe_host()
    print(json.dumps(host.as_dict(), indent=2))
    if host.profiles_differ:
        print(
            "this CPU's default INT8 kernels saturate int16 pair sums: 'host' and 'exact' "
            "profiles give different numbers; results use 'exact' unless --int8-kernels host",
            file=sys.stderr,
        )
    else:
        print("this CPU's INT8 kernels are int32-exact: both profiles coincide", file=sys.stderr)
    return 0


def _intake_overrides(args: argparse.Namespace) -> Any:
    """What the auditor states about the model's input, from the preprocessing flags."""
    given = {
        "mean": args.mean,
        "std": args.std,
        "scale": args.scale,
        "layout": args.layout,
        "channel_order": args.channel_order,
    }
    return IntakeOverrides(**{k: v for k, v in given.items() if v is not None})


def _read_params_file(path: str | None) -> dict[str, Any]:
    """``--defense-params FILE``: a JSON or TOML table of per-defense parameter tables."""
    if path is None:
        return {}

    file = Path(path)
    if not file.is_file():
        raise BlindspotsError(f"--defense-params file not found: {file}")
    try:
        text = file.read_text()
        value = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise BlindspotsError(f"{file}: cannot parse defense parameters: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise BlindspotsError(
            f"{file}: expected a table of tables, e.g. [neural_cleanse] steps=200"
        )
    return value


def cmd_audit(args: argparse.Namespace) -> int:
    request = AuditRequest(
        model=Path(args.model),
        dataset=args.dataset,
        data_root=args.data_root,
        out=Path(args.out),
        defenses=args.defenses or AuditRequest.model_fields["defenses"].default_factory(),
        defense_params=_read_params_file(args.defense_params),
        precisions=[p.strip() for p in args.precisions.split(",") if p.strip()] or [PUBLISHED],
        trained_on_dataset=args.trained_on_dataset,
        sample_size=args.sample_size,
        seed=args.seed,
        int8_kernels=args.int8_kernels,
        overrides=_intake_overrides(args),
    )
    report = run_audit(request, log=_log)
    print("| artifact | clean acc | agreement | defense | verdict | suspected | rests on |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(verdict_rows(report)))
    print(f"wrote {request.out / 'audit.json'} and {request.out / 'audit.md'}")
    return 0


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


def cmd_list(args: argparse.Namespace) -> int:
    for registry in (DATASETS, ATTACKS, MODELS, PRECISIONS, DEFENSES):
        print(f"{registry.kind}s: {', '.join(registry.names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blindspots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="whole pipeline on the embedded digits set, all precisions and defenses"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    _kernel_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run an experiment from a TOML/JSON config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", default=None, help="override the config's dataset")
    p.add_argument("--data-root", default=None, help="override the config's data_root")
    _kernel_args(p, default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "report", help="rebuild report.json / report.md / report.html / plots from a run folder"
    )
    p.add_argument("folder")
    p.set_defaults(func=cmd_report)

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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX with a parity check")
    _dataset_args(p)
    p.add_argument("--state", required=True, help="checkpoint from 'blindspots train'")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="clean accuracy / ASR (and defenses) of one ONNX model")
    _dataset_args(p)
    p.add_argument("--model", required=True, help="ONNX file to audit")
    p.add_argument("--reference", default=None, help="FP32 ONNX file for top-1 agreement")
    p.add_argument("--attack", default="badnet")
    p.add_argument("--attack-params", default=None)
    p.add_argument("--defenses", nargs="*", default=None)
    p.add_argument(
        "--trained-on-dataset",
        action="store_true",
        help="the model was trained on this dataset's training split (enables AC / SS)",
    )
    _preprocessing_flags(p)
    _kernel_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "audit", help="audit a vendor's ONNX classifier as published (and its quantized copies)"
    )
    p.add_argument("model", help="the ONNX file to audit (read as untrusted, never modified)")
    _dataset_args(p)
    p.add_argument("--defenses", nargs="*", default=None, help="default: NC, AC, SS, STRIP")
    p.add_argument("--defense-params", default=None, help="JSON/TOML file of per-defense tables")
    p.add_argument(
        "--precisions",
        default="published",
        help="comma list: 'published' and/or precisions to build from a float model "
        "(e.g. published,int8-static,int4)",
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
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "kernels", help="measure whether this CPU's INT8 kernels saturate (host vs exact profile)"
    )
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("list", help="registered datasets, attacks, models, precisions, defenses")
    p.set_defaults(func=cmd_list)
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
