"""Build an audit's clean-control reference: the project's own models, put through the audit.

    python tools/control_reference.py configs/audit/controls-digits.toml --budget quick \\
        --work runs/controls-digits --out harness/audit/references/digits-small_cnn-quick.json
    python tools/control_reference.py summary harness/audit/references/digits-small_cnn-quick.json

For every seed of the config, the clean control and the poisoned model (the config's recipe,
trained, exported and cached under ``--work`` exactly as a sweep does) are audited as float
files with ``--precisions published,...`` at ``--budget``; each defense's verdict, suspects and
model-level score per artifact go into the reference, with the command, commit, date and CPU.
``blindspots audit --model-family FAMILY`` then reads a verdict against it
(:mod:`harness.audit.controls`): how often the same defense, at the same budget, fired on
clean models of this dataset and family, and where the audited score sits among theirs.
Finished audits are reused (``--work`` is a cache), so an interrupted build resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._cpu import cpu_label  # noqa: E402
from harness.audit.controls import (  # noqa: E402
    REFERENCE_SCHEMA,
    ControlReference,
    load_reference,
    summary_table,
)
from harness.audit.run import PUBLISHED, AuditRequest, run_audit  # noqa: E402
from harness.core.atomic import atomic_write_text  # noqa: E402
from harness.pipeline.config import load_config  # noqa: E402
from harness.pipeline.runner import git_provenance, prepare_seed  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def audit_model(
    model: Path, config: Any, budget: str, precisions: list[str], out: Path
) -> dict[str, Any]:
    """The audit report of one model (read back from ``out`` when it was finished before)."""
    done = out / "audit.json"
    if done.is_file():
        return json.loads(done.read_text())
    request = AuditRequest(
        model=model,
        dataset=config.dataset_name,
        data_root=config.data_location,
        out=out,
        precisions=precisions,
        budget=budget,
    )
    return run_audit(request, log=_log)


def model_entry(report: dict[str, Any], seed: int, poisoned: bool, target: int | None):
    """One reference model from an audit report: per artifact precision, per defense."""
    artifacts: dict[str, dict[str, Any]] = {}
    for cell in report["cells"]:
        entries = artifacts.setdefault(cell["precision"], {})
        for name, entry in cell.get("defenses", {}).items():
            result = entry.get("result") or {}
            entries[name] = {
                "verdict": entry["verdict"],
                "suspected_labels": list(entry.get("suspected_labels") or []),
                "score": result.get("score"),
                "score_name": result.get("score_name"),
            }
    return {
        "seed": seed,
        "poisoned": poisoned,
        "target_label": target if poisoned else None,
        "artifacts": artifacts,
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["summary"]:  # python tools/control_reference.py summary REFERENCE.json
        print(summary_table(load_reference(argv[1])), end="")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="sweep config whose recipe and seeds make the models")
    parser.add_argument("--budget", choices=["quick", "paper"], default="quick")
    parser.add_argument(
        "--precisions",
        default=f"{PUBLISHED},int8-static,int4",
        help="artifacts each audit builds from the float file (the audit's --precisions)",
    )
    parser.add_argument("--seeds", help="comma-separated seeds instead of the config's")
    parser.add_argument("--family", help="model family name (default: the config's model)")
    parser.add_argument("--work", required=True, type=Path, help="cache of models and audits")
    parser.add_argument("--out", required=True, type=Path, help="reference JSON to write")
    args = parser.parse_args(argv)
    provenance = git_provenance()  # the code that runs is the code at start, not at the end

    configs = load_config(args.config, {"precisions": ["fp32"], "clean_control": True}).expand()
    if len(configs) != 1:
        parser.error("the config names several datasets, models or attacks: one reference each")
    config = configs[0]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(config.seeds)
    precisions = args.precisions.split(",")
    # a cached audit is reused only for the same budget and artifacts (the path says which)
    audits = args.work / "audits" / f"{args.budget}-{'+'.join(precisions)}"
    models = []
    for seed in seeds:
        prepared = prepare_seed(config, seed, args.work, _log, variants=[False, True])
        target = prepared.attack.target_label
        for poisoned in (False, True):
            kind = "poisoned" if poisoned else "clean"
            model = prepared.artifacts[poisoned]["fp32-reference"]
            _log(f"seed {seed}: auditing the {kind} model {model}")
            report = audit_model(model, config, args.budget, precisions, audits / f"s{seed}-{kind}")
            models.append(model_entry(report, seed, poisoned, target))
    reference = {
        "schema": REFERENCE_SCHEMA,
        "dataset": config.dataset_name,
        "model_family": args.family or config.model_name,
        "budget": args.budget,
        "attack": {"name": config.attack_name, "params": config.attack_params},
        "provenance": {
            "command": "python tools/control_reference.py " + shlex.join(argv),
            "config": Path(args.config).name,
            "precisions": precisions,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "cpu": cpu_label(),
            "python": platform.python_version(),
            **provenance,
        },
        "models": models,
    }
    ControlReference.model_validate(reference)  # the audit must be able to read what we write
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(reference, indent=1, sort_keys=True) + "\n")
    _log(f"wrote {args.out}: {len(models)} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
