"""``blindspots sweep plan|run|status`` and ``blindspots reproduce``.

Exit codes, for scripts and CI: 0 every (selected) cell is done; 1 some cell failed or was not
run (its error is kept; ``sweep run --retry-failed`` or ``--only CELL`` retries it); 2 a usage
error (bad flag, config or path: one line on stderr, from :func:`harness.cli.app.main`).
``sweep plan`` lists cells and exits 0 unless some have failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import BlindspotsError
from harness.pipeline.executors import EXECUTORS, make_executor
from harness.pipeline.store import read_json

if TYPE_CHECKING:  # the pipeline floor loads torch: handlers import it when they run
    from harness.pipeline.config import ExperimentConfig
    from harness.pipeline.sweep import PlannedCell

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "grids"
"""The repository's configs (the paper's are ``paper-<dataset>[-small].toml``)."""
PAPER_DATASETS = ("gtsrb", "cifar10")


def _positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _seed_list(text: str) -> list[int]:
    """argparse type: ``0,1,2`` — distinct whole numbers ≥ 0 (else a usage error)."""
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(text)
    return seeds


def with_seeds(config: ExperimentConfig, seeds: list[int] | None) -> ExperimentConfig:
    """``config`` over ``seeds`` instead of its own list (None: unchanged).

    A cell's id leaves out the other seeds of the sweep, so a run with ``--seeds 0`` fills
    exactly the cells a later run of every seed would, and that run keeps them.
    """
    from harness.pipeline.config import build_config

    if seeds is None:
        return config
    return build_config({**config.model_dump(), "seeds": seeds}, "--seeds")


def _seeds_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="0,1,...",
        help="run these seeds instead of the config's (finished cells are shared either way)",
    )


def _executor_args(parser: argparse.ArgumentParser) -> None:
    _seeds_arg(parser)
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="where cells run: serial, local processes (default on a multi-core machine) or "
        "dask (needs the [dask] extra)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="parallel workers (default: one per core; a local Dask cluster's size)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch/onnxruntime threads per worker (default 1 for parallel executors, the "
        "config's own setting for serial)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run on this Dask scheduler's workers (implies --executor dask; the output folder "
        "must be reachable at the same path from every worker)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="CELL",
        help="compute only these cells (id, id prefix of 4+ characters, or name), failed or not",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="also recompute cells whose last attempt failed (skipped by default)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not rebuild report.json/report.md/report.html afterwards",
    )


def _format_plan(planned: list[PlannedCell]) -> str:
    """A fixed-width table of cells and states, errors at the end of failed rows."""
    from harness.pipeline.sweep import count_states

    header = ("cell", "state", "dataset", "model", "attack", "seed", "kind", "precision")
    rows = [header]
    errors = []
    for item in planned:
        cell = item.cell
        rows.append(
            (
                cell.key,
                item.state,
                cell.config.dataset,
                cell.config.model,
                cell.config.attack,
                str(cell.seed),
                "poisoned" if cell.poisoned else "clean",
                cell.precision,
            )
        )
        errors.append(item.error)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row, error in zip(rows, [None, *errors], strict=True):
        line = "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        lines.append((line + (f"  {error}" if error else "")).rstrip())
    counts = count_states(planned)
    lines.append(
        f"{len(planned)} cells: {counts['done']} done, {counts['pending']} pending, "
        f"{counts['failed']} failed"
    )
    return "\n".join(lines)


def cmd_sweep_plan(args: argparse.Namespace) -> int:
    from harness.pipeline.config import load_config
    from harness.pipeline.sweep import count_states, plan

    planned = plan(with_seeds(load_config(args.config), args.seeds), args.out)
    print(_format_plan(planned))
    return 1 if count_states(planned)["failed"] else 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from harness.pipeline.config import build_config
    from harness.pipeline.sweep import count_states, plan

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        raise BlindspotsError(f"{folder} holds no sweep (no config.json)")
    config = build_config(read_json(folder / "config.json"), str(folder / "config.json"))
    planned = plan(config, folder)
    counts = count_states(planned)
    print(
        f"{folder}: {len(planned)} cells: {counts['done']} done, {counts['pending']} pending, "
        f"{counts['failed']} failed"
    )
    for item in planned:
        if item.state == "failed":
            print(f"failed {item.cell.key} {item.cell.name}: {item.error}")
    return 1 if counts["failed"] else 0


def _run(config: ExperimentConfig, out: Path, args: argparse.Namespace) -> int:
    """Run a sweep with the executor flags, print its outcome, rebuild the report."""
    from harness.pipeline.sweep import run_sweep, stderr_log
    from harness.report.document import write_report

    with make_executor(args.executor, args.workers, args.scheduler, args.threads) as executor:
        summary = run_sweep(
            config,
            out,
            executor,
            only=args.only,
            retry_failed=args.retry_failed,
            log=stderr_log,
        )
    print(
        f"{summary.selected} cell(s) selected: {summary.done} done, {summary.failed} failed, "
        f"{summary.not_run} not run ({summary.wall_s:.0f}s)"
        + (f"; {summary.failed_before} earlier failure(s) kept" if summary.failed_before else "")
    )
    for key, error in summary.errors.items():
        print(f"failed {key}: {error}")
    if not args.no_report and (out / "results.jsonl").is_file():
        paths = write_report(out)
        print(f"wrote {paths['json']}, {paths['markdown']} and {paths['html']}")
    return summary.exit_code


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from harness.pipeline.config import load_config

    return _run(with_seeds(load_config(args.config), args.seeds), Path(args.out), args)


def paper_config_path(dataset: str, small: bool) -> Path:
    """``paper-<dataset>[-small].toml``: beside the package in a checkout (or an editable
    install), else in ``./configs/grids`` — a plain ``pip install .`` ships only the packages, and
    the Docker image runs from ``/app``, which holds the configs."""
    name = f"paper-{dataset}{'-small' if small else ''}.toml"
    places = [CONFIGS_DIR, Path.cwd() / "configs" / "grids"]
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    looked = " and ".join(str(folder) for folder in dict.fromkeys(places))
    raise BlindspotsError(
        f"paper config {name} not found in {looked}: run from a checkout of the repository"
    )


def resolve_data_root(given: str, configured: str | None) -> str:
    """``--data-root``: a file, or a folder holding the config's file (e.g. ``gtsrb32.npz``).

    A folder without that file is passed on as is: the dataset loader then says what it
    expected there.
    """
    path = Path(given)
    if not path.exists():
        raise BlindspotsError(f"--data-root {path} does not exist")
    if path.is_dir() and configured is not None and (path / Path(configured).name).is_file():
        return str(path / Path(configured).name)
    return str(path)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from harness.pipeline.config import build_config, load_config
    from harness.pipeline.sweep import stderr_log

    source = paper_config_path(args.dataset, args.small)
    config = load_config(source)
    configured = config.data_root if isinstance(config.data_root, str) else None
    overrides: dict[str, Any] = {"data_root": resolve_data_root(args.data_root, configured)}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    config = build_config({**config.model_dump(), **overrides}, str(source))
    out = Path(args.out or f"runs/paper-{args.dataset}{'-small' if args.small else ''}")
    stderr_log(f"reproduce: {source} into {out}")
    return _run(config, out, args)


def add_commands(subparsers: Any) -> None:
    """Add ``sweep`` (plan / run / status) and ``reproduce`` to the ``blindspots`` parser."""
    sweep = subparsers.add_parser(
        "sweep", help="cells over datasets × models × attacks × precisions × seeds"
    )
    commands = sweep.add_subparsers(dest="sweep_command", required=True)

    p = commands.add_parser("plan", help="list a config's cells with their state")
    p.add_argument("config", help="TOML/JSON config (lists allowed for dataset, model, attack)")
    p.add_argument("--out", default=None, help="output folder to read states from")
    _seeds_arg(p)
    p.set_defaults(func=cmd_sweep_plan)

    p = commands.add_parser("run", help="compute the pending cells of a config")
    p.add_argument("config", help="TOML/JSON config")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    _executor_args(p)
    p.set_defaults(func=cmd_sweep_run)

    p = commands.add_parser("status", help="counts and errors of a sweep's output folder")
    p.add_argument("folder")
    p.set_defaults(func=cmd_sweep_status)

    p = subparsers.add_parser(
        "reproduce", help="the paper's table for one dataset, end to end (configs/paper-*.toml)"
    )
    p.add_argument("--dataset", required=True, choices=PAPER_DATASETS)
    p.add_argument(
        "--data-root",
        required=True,
        help="the dataset's .npz (or a folder holding gtsrb32.npz / cifar10_25k.npz)",
    )
    p.add_argument(
        "--small", action="store_true", help="the variant that fits a 2-core CPU in under an hour"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/paper-<dataset>, -small with --small)",
    )
    _executor_args(p)
    p.set_defaults(func=cmd_reproduce)
