"""``blindspots demo | run | report | train | export | quantize | evaluate``: the pipeline, whole
or one step at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from exporters.catalog import PRECISIONS
from exporters.onnx_export import export_onnx
from exporters.quantization import quantize
from exporters.recipes import resolve_recipe
from harness.artifacts.attack_metadata import read_attack
from harness.artifacts.intake import IntakeOverrides, check_num_classes
from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import build_attack
from harness.audit.run import (
    open_vendor_model,
    vendor_adapter,
)
from harness.core.errors import BlindspotsError
from harness.core.sampling import stable_seed
from harness.data.base import load_dataset
from harness.pipeline.config import load_config, parse_json_object
from harness.pipeline.evaluate import (
    DefensePlan,
    TrainingImages,
    calibration_draw,
    cell_defense_data,
    defense_pools,
    evaluate_artifact,
    evaluation_images,
)
from harness.pipeline.runner import run_experiment
from harness.report.document import write_report
from harness.runtime.model_safety import load_untrusted
from harness.runtime.sanity import check_outputs, raise_on_errors
from harness.training.loop import (
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
    # poison; configs/grids/gtsrb_badnet.toml covers the low-rate regime AC and SS assume.)
    "attack_params": {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 30, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
    "threads": 1,
    "calibration_size": 256,
    "defense_clean_size": 225,
    # The two-minute demo runs the defenses that take seconds here; Neural Cleanse and
    # Fine-Pruning (minutes) run with `blindspots demo --full` (harness/cli/demo.py).
    "defenses": ["strip", "activation_clustering", "spectral_signatures"],
    # STRIP's paper fits its threshold on 2000 clean inputs; digits holds 225 for defenses, so
    # the demo names the deviation (defenses/strip.py) instead of reporting "inconclusive".
    "defense_params": {"strip": {"n_overlays": 50, "n_test": 100, "n_clean_fit": 100}},
}


EVALUATE_DEFENSE_IMAGES = 200
"""Held-out clean (and triggered) images ``evaluate`` gives defenses: the runner's default."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def cmd_demo(args: argparse.Namespace) -> int:
    from harness.cli.demo import run_demo

    return run_demo(args, DEMO_CONFIG)


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
    if recipe.needs_calibration:  # as the runner draws it
        x = load_dataset(args.dataset, args.data_root).x_train
        calibration = calibration_draw(x, args.calibration_size, args.seed)
    artifact = quantize(
        args.precision, args.model, args.out, calibration, overrides or None, explicit
    )
    print(artifact.model_dump_json(indent=2))
    return 0


def _evaluation_attack(args: argparse.Namespace, model: Any) -> tuple[Any, str]:
    """The trigger ``evaluate`` stamps: the command line's when it names one, else the attack
    the model's metadata records (exports carry it), else BadNet's defaults."""
    stored = read_attack({p.key: p.value for p in model.metadata_props})
    if args.attack is None and args.attack_params is None and stored is not None:
        return build_attack(stored.name, stored.params), "model metadata"
    params = parse_json_object(args.attack_params, "--attack-params")
    source = "command line" if args.attack or args.attack_params else "default"
    return build_attack(args.attack or "badnet", params), source


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Measure one ONNX file (and run defenses on it) through the runner's evaluation path.

    The file is measured as a runner cell is (:func:`~harness.pipeline.evaluate.evaluate_artifact`:
    metrics, the defenses, and where this host's INT8 kernels differ from int32-exact arithmetic
    the same under the other profile, ``kernel_drift``), and the defenses see the held-out clean
    and triggered pools the runner draws for seed 0, so a number here can be compared with the
    same model's cell in a run. What a cell has and this file lacks is left out: agreement
    without ``--reference``, AC / SS without ``--trained-on-dataset``, Fine-Pruning's repair (no
    checkpoint to fine-tune).
    """
    overrides = _intake_overrides(args)
    data = load_dataset(args.dataset, args.data_root)
    vendor = open_vendor_model(args.model, overrides)
    check_num_classes(vendor.intake, data.num_classes)
    adapter = vendor_adapter(vendor, args.int8_kernels)
    raise_on_errors(check_outputs(adapter.logits(data.x_test), data.y_test))
    attack, attack_source = _evaluation_attack(args, vendor.intake.model)
    images = evaluation_images(data, attack)
    reference = None
    if args.reference:
        reference = vendor_adapter(open_vendor_model(args.reference, overrides), args.int8_kernels)
    pools = defense_pools(data, attack, seed=0, clean_size=EVALUATE_DEFENSE_IMAGES)
    defense_data = cell_defense_data(
        data.num_classes,
        pools,
        # AC / SS analyse the data the model was trained on; only the user knows that it
        # was this dataset's training split (otherwise they report not_applicable).
        training=TrainingImages(data.x_train, data.y_train) if args.trained_on_dataset else None,
        poison_rate=attack.poison_rate,
        reference=None if adapter.precision == "fp32" else reference,
    )
    evaluation = evaluate_artifact(
        adapter,
        images,
        None if reference is None else reference.predict(images.x),
        defense_data,
        DefensePlan(args.defenses or [], {}, seed=0),
        Path(args.model).name,
        _log,
    )
    fields = dict(evaluation.fields)
    if not args.defenses:
        fields.pop("defenses")
    result: dict[str, Any] = {
        "model": str(args.model),
        "precision": adapter.precision,
        **fields,
        "attack": {**attack.describe(), "from": attack_source},
        "layers": adapter.layers,
    }
    print(json.dumps(result, indent=2))
    return 0
