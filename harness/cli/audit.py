"""``blindspots audit``: a vendor's ONNX classifier audited as published (harness.audit)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

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
