"""``blindspots audit``: a vendor's ONNX classifier audited as published (harness.audit)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from defenses.base import default_defenses
from harness.audit.ci import exit_status, write_junit
from harness.audit.run import (
    PUBLISHED,
    AuditRequest,
    run_audit,
    verdict_rows,
)
from harness.cli.steps import _intake_overrides, _log
from harness.core.errors import BlindspotsError


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
    """Run the audit; the exit status follows ``--fail-on`` (:mod:`harness.audit.ci`)."""
    request = AuditRequest(
        model=Path(args.model),
        dataset=args.dataset,
        data_root=args.data_root,
        out=Path(args.out),
        defenses=args.defenses or default_defenses("audit"),
        defense_params=_read_params_file(args.defense_params),
        precisions=[p.strip() for p in args.precisions.split(",") if p.strip()] or [PUBLISHED],
        deployed=[Path(path) for path in args.deployed],
        budget=args.budget,
        trained_on_dataset=args.trained_on_dataset,
        sample_size=args.sample_size,
        seed=args.seed,
        int8_kernels=args.int8_kernels,
        overrides=_intake_overrides(args),
        model_family=args.model_family,
        controls=[Path(path) for path in args.controls],
    )
    report = run_audit(request, log=_log)
    print(
        "| artifact | clean acc | agreement | defense | verdict | suspected | rests on "
        "| on clean controls |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(verdict_rows(report)))
    written = [request.out / name for name in ("audit.json", "audit.md", "audit.html")]
    if args.junit:
        write_junit(report, args.fail_on, Path(args.junit))
        written.append(Path(args.junit))
    print(f"overall: {report['overall']['verdict']}")
    print("wrote " + ", ".join(str(path) for path in written))
    return exit_status(report, args.fail_on)
