"""Sweeps: expansion into cells, content-hash ids, resume / retry / --only, executors agree.

The executor tests run the same tiny digits sweep (1 epoch, FP32 + INT8-dynamic, two fast
defenses) serially, on local worker processes and on a Dask ``LocalCluster``, and require the
same metrics and the same verdicts in every cell.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import harness.cli.sweep
import harness.pipeline.config
import harness.pipeline.sweep
from harness.cli.sweep import CONFIGS_DIR, add_commands, paper_config_path, resolve_data_root
from harness.core.errors import BlindspotsError
from harness.pipeline.config import build_config, load_config
from harness.pipeline.executors import DaskExecutor, ProcessExecutor, SerialExecutor, make_executor
from harness.pipeline.runner import run_experiment
from harness.pipeline.store import ResultStore
from harness.pipeline.sweep import plan, run_sweep, select
from tests.conftest import dask_executor, write_rgb_npz

SWEEP = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    "attack_params": {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 1, "batch_size": 64},
    "seeds": [0],
    "precisions": ["fp32", "int8-dynamic"],
    "defenses": ["strip", "spectral_signatures"],
    "defense_params": {"strip": {"n_overlays": 10, "n_test": 50}},
    "threads": 1,
}


def _quiet(_: str) -> None:
    pass


def _tiny_npz(path: Path, seed: int = 0) -> Path:
    return write_rgb_npz(path, 40, 20, classes=4, seed=seed)


def _cells(config: dict) -> dict[str, tuple]:
    return {
        p.cell.key: (p.cell.name, p.cell.config.attack_params) for p in plan(build_config(config))
    }


def _outcomes(folder: Path) -> dict[str, tuple]:
    """What a reader of the table relies on, per cell id: metrics and every verdict."""
    return {
        r["cell"]: (
            r["clean_acc"],
            r["asr"],
            r["agreement_fp32"],
            {
                name: (res["status"], res["detected"], res["score"])
                for name, res in r["defenses"].items()
            },
        )
        for r in ResultStore(folder).records()
    }


# --- expansion and hashing ------------------------------------------------------------------


def test_a_config_expands_over_every_axis_with_per_item_settings(tmp_path):
    npz = _tiny_npz(tmp_path / "tiny.npz")
    config = {
        **SWEEP,
        "dataset": ["digits", "npz"],
        "data_root": {"npz": str(npz)},
        "attack": ["badnet", "blended"],
        "attack_params": {"badnet": {"patch_size": 2, "margin": 0}, "blended": {"alpha": 0.2}},
        "seeds": [0, 1],
    }
    planned = plan(build_config(config))
    assert len(planned) == 2 * 2 * 2 * 2 * 2  # datasets × attacks × seeds × variants × precisions
    assert len({p.cell.key for p in planned}) == len(planned)
    assert all(p.state == "pending" for p in planned)
    names = [p.cell.name for p in planned]
    assert names[:4] == [
        "digits-small_cnn-badnet-s0-poisoned-fp32",
        "digits-small_cnn-badnet-s0-poisoned-int8-dynamic",
        "digits-small_cnn-badnet-s0-clean-fp32",
        "digits-small_cnn-badnet-s0-clean-int8-dynamic",
    ]
    by_name = {p.cell.name: p.cell.config for p in planned}
    blended = by_name["npz-small_cnn-blended-s1-clean-fp32"]
    assert blended.attack_params == {"alpha": 0.2}
    assert blended.data_root == str(npz)
    assert by_name["digits-small_cnn-badnet-s0-clean-fp32"].data_root is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dataset": ["digits", "npz"], "data_root": "x.npz"}, "table keyed by dataset name"),
        ({"attack": ["badnet"], "attack_params": {"patch_size": 3}}, "unknown: ['patch_size']"),
        ({"data_root": {"npz": "x.npz"}}, "needs a list of datasets"),
        ({"model": ["small_cnn", "small_cnn"]}, "duplicate entries"),
    ],
)
def test_list_axes_need_tables_keyed_by_name(raw, message):
    with pytest.raises(BlindspotsError, match="config: invalid option") as info:
        build_config({**SWEEP, **raw})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cell_ids_hash_content_not_paths_thread_counts_or_other_cells(tmp_path, monkeypatch):
    npz = _tiny_npz(tmp_path / "a.npz")
    config = {**SWEEP, "dataset": "npz", "data_root": str(npz)}
    base = _cells(config)
    assert _cells(config) == base  # stable
    # the same bytes elsewhere, another thread count, an added seed: finished cells stay valid
    moved = tmp_path / "moved" / "b.npz"
    moved.parent.mkdir()
    shutil.copy(npz, moved)
    assert _cells({**config, "data_root": str(moved)}).keys() == base.keys()
    assert _cells({**config, "threads": 2}).keys() == base.keys()
    assert base.keys() < _cells({**config, "seeds": [0, 1]}).keys()
    # spelling out a default attack parameter is the same experiment
    explicit = {**config["attack_params"], "pattern": "solid"}
    assert _cells({**config, "attack_params": explicit}).keys() == base.keys()
    # anything that changes a cell's numbers gives new ids
    _tiny_npz(moved, seed=1)
    assert not _cells({**config, "data_root": str(moved)}).keys() & base.keys()
    strip = {"strip": {"n_overlays": 11, "n_test": 50}}
    assert not _cells({**config, "defense_params": strip}).keys() & base.keys()
    assert not _cells({**config, "training": {"epochs": 2}}).keys() & base.keys()
    monkeypatch.setattr(harness.pipeline.config, "__version__", "9.9.9")
    assert not _cells(config).keys() & base.keys()


def test_a_missing_data_root_is_one_line_before_any_work(tmp_path):
    config = build_config({**SWEEP, "dataset": "npz", "data_root": str(tmp_path / "no.npz")})
    with pytest.raises(BlindspotsError, match=r"npz: data_root .*no\.npz does not exist"):
        plan(config)


# --- running, resuming, failing, retrying ---------------------------------------------------


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial")
    with SerialExecutor() as executor:
        summary = run_sweep(build_config(SWEEP), out, executor, log=_quiet)
    assert (summary.selected, summary.done, summary.exit_code) == (4, 4, 0)
    return out


def test_a_finished_sweep_is_all_done_and_a_rerun_computes_nothing(serial_run):
    assert [p.state for p in plan(build_config(SWEEP), serial_run)] == ["done"] * 4
    logs: list[str] = []
    with SerialExecutor() as executor:
        summary = run_sweep(build_config(SWEEP), serial_run, executor, log=logs.append)
    assert (summary.selected, summary.exit_code) == (0, 0)
    assert len(ResultStore(serial_run).records()) == 4
    record = ResultStore(serial_run).records()[0]
    assert record["timings"]["train_s"] > 0  # the prepare task's time is recorded with the cell


def test_a_failed_cell_keeps_its_error_and_is_retried_alone(serial_run, tmp_path, monkeypatch):
    shutil.copytree(serial_run / "artifacts", tmp_path / "artifacts")  # skip retraining
    real = harness.pipeline.sweep.evaluate_cell

    def planted(config, models, sets, poisoned, precision, log):
        if precision == "int8-dynamic" and not poisoned:
            raise RuntimeError("planted failure\nsecond line")
        return real(config, models, sets, poisoned, precision, log)

    monkeypatch.setattr(harness.pipeline.sweep, "evaluate_cell", planted)
    config = build_config(SWEEP)
    with SerialExecutor() as executor:
        summary = run_sweep(config, tmp_path, executor, log=_quiet)
    assert (summary.done, summary.failed, summary.exit_code) == (3, 1, 1)
    states = {p.cell.name: (p.state, p.error) for p in plan(config, tmp_path)}
    failed = states.pop("digits-small_cnn-badnet-s0-clean-int8-dynamic")
    assert failed == ("failed", "RuntimeError: planted failure")
    assert {state for state, _ in states.values()} == {"done"}
    assert len(ResultStore(tmp_path).records()) == 3  # a failure is no result line

    with SerialExecutor() as executor:  # a plain rerun keeps the failure: exit 1, nothing run
        again = run_sweep(config, tmp_path, executor, log=_quiet)
    assert (again.selected, again.failed_before, again.exit_code) == (0, 1, 1)

    monkeypatch.setattr(harness.pipeline.sweep, "evaluate_cell", real)
    with SerialExecutor() as executor:
        retried = run_sweep(config, tmp_path, executor, retry_failed=True, log=_quiet)
    assert (retried.selected, retried.done, retried.exit_code) == (1, 1, 0)
    assert not list((tmp_path / "failed").iterdir())
    assert _outcomes(tmp_path) == _outcomes(serial_run)


def test_blindspots_run_and_sweep_run_fill_the_same_cells_with_the_same_numbers(
    serial_run, tmp_path
):
    run_experiment(build_config(SWEEP), tmp_path, log=_quiet)
    assert [p.state for p in plan(build_config(SWEEP), tmp_path)] == ["done"] * 4
    assert _outcomes(tmp_path) == _outcomes(serial_run)


def test_only_names_cells_by_id_prefix_or_name(serial_run):
    planned = plan(build_config(SWEEP), serial_run)
    key = planned[1].cell.key
    scope, to_run = select(planned, [key[:6]])
    assert [p.cell.key for p in scope] == [key] and to_run == []  # done: nothing to compute
    scope, _ = select(planned, ["digits-small_cnn-badnet-s0-clean-fp32"])
    assert scope[0].cell.precision == "fp32" and not scope[0].cell.poisoned
    with pytest.raises(BlindspotsError, match="no cell of this sweep matches 'zzzz'"):
        select(planned, ["zzzz"])
    with pytest.raises(BlindspotsError, match="no cell of this sweep matches"):
        select(planned, [key[:3]])  # too short to be taken as an id prefix


def test_a_folder_filled_under_other_settings_is_refused(serial_run):
    changed = build_config({**SWEEP, "defense_params": {"strip": {"n_overlays": 12}}})
    with pytest.raises(BlindspotsError, match=r"already holds .* computed with other settings"):
        plan(changed, serial_run)


KILLED_SWEEP = """
    import os, signal, sys
    import harness.pipeline.store
    from harness.cli.sweep import add_commands
    import argparse

    real_write_all, lines = harness.pipeline.store.write_all, []

    def write_all(fd, data):  # the second results line: half written, then SIGKILL
        lines.append(data)
        if len(lines) == 2:
            real_write_all(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_write_all(fd, data)

    harness.pipeline.store.write_all = write_all
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
"""


def test_a_sigkilled_sweep_resumes_without_losing_or_recomputing_a_cell(tmp_path):
    tiny = {**SWEEP, "precisions": ["fp32"], "defenses": [], "eval_limit": 200}
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny))
    out = tmp_path / "out"
    argv = ["sweep", "run", str(config), "--out", str(out), "--executor", "serial"]
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_SWEEP), *argv],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    (first,) = ResultStore(out).records()
    states = [p.state for p in plan(build_config(tiny), out)]
    assert sorted(states) == ["done", "pending"]

    logs: list[str] = []
    with SerialExecutor() as executor:
        summary = run_sweep(build_config(tiny), out, executor, log=logs.append)
    assert (summary.selected, summary.done, summary.exit_code) == (1, 1, 0)
    assert sum(first["cell"] in line for line in logs) == 0  # finished before the kill: kept
    stored = ResultStore(out).records()
    assert stored[0] == first and len(stored) == 2
    assert len(list(out.glob("results.jsonl.torn-*"))) == 1  # the half line, kept aside


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blindspots")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_exit_codes_and_plan_listing(serial_run, tmp_path, capsys):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps(SWEEP))
    args = _parse(["sweep", "plan", str(config), "--out", str(serial_run)])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    assert "4 cells: 4 done, 0 pending, 0 failed" in listing
    assert "digits   small_cnn  badnet  0     clean     int8-dynamic" in listing
    args = _parse(["sweep", "run", str(config), "--out", str(serial_run), "--executor", "serial"])
    assert args.func(args) == 0  # nothing left to do, nothing failed

    # a folder whose last cell failed: status names it and exits 1
    folder = tmp_path / "run"
    shutil.copytree(serial_run, folder, ignore=shutil.ignore_patterns(".lock"))
    lines = (folder / "results.jsonl").read_text().splitlines(keepends=True)
    (folder / "results.jsonl").write_text("".join(lines[:-1]))
    lost = json.loads(lines[-1])
    (folder / "failed").mkdir()
    (folder / "failed" / f"{lost['cell']}.json").write_text(json.dumps({"error": "out of memory"}))
    args = _parse(["sweep", "status", str(folder)])
    assert args.func(args) == 1
    assert f"failed {lost['cell']} " in capsys.readouterr().out
    args = _parse(["sweep", "plan", str(config), "--out", str(folder)])
    assert args.func(args) == 1
    assert "out of memory" in capsys.readouterr().out

    with pytest.raises(SystemExit) as usage:
        _parse(["sweep", "run", str(config), "--out", "o", "--workers", "0"])
    assert usage.value.code == 2
    args = _parse(["sweep", "status", str(tmp_path / "nothing")])
    with pytest.raises(BlindspotsError, match="holds no sweep"):
        args.func(args)


def test_executor_choice_is_checked():
    with pytest.raises(BlindspotsError, match="cannot be combined with serial"):
        make_executor("serial", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(BlindspotsError, match="workers must be at least 1"):
        make_executor("processes", workers=0)


class _RecordingExecutor(SerialExecutor):
    """Serial execution posing as two workers; records what the driver hands it, in order."""

    workers = 2

    def __init__(self) -> None:
        super().__init__(threads_per_worker=1)
        self.submitted: list[tuple[str, int]] = []
        self.outstanding: set = set()  # handed out, not yet reported finished to the driver
        self.most_in_flight = 0

    def submit(self, fn, arg):
        seed = arg.seed if hasattr(arg, "seed") else arg.cell.seed
        self.submitted.append((fn.__name__, seed))
        future = super().submit(fn, arg)
        self.outstanding.add(future)
        self.most_in_flight = max(self.most_in_flight, len(self.outstanding))
        return future

    def wait(self, pending):
        finished = super().wait(pending)
        self.outstanding.difference_update(finished)
        return finished


def test_cells_run_before_the_next_seed_trains(tmp_path):
    """A sweep cut short holds whole seeds: seed 1 trains only once seed 0's cells are handed out."""
    executor = _RecordingExecutor()
    summary = run_sweep(build_config({**SWEEP, "seeds": [0, 1]}), tmp_path, executor, log=_quiet)
    assert (summary.done, summary.exit_code) == (8, 0)
    seeds = [seed for _, seed in executor.submitted]
    assert seeds == sorted(seeds), executor.submitted
    kinds = [name for name, _ in executor.submitted]
    assert kinds.count("run_prepare") == 4 and kinds.count("run_cell") == 8
    assert executor.most_in_flight == 2  # every worker busy, none given a queue of its own


class _GrowingClient:
    """A Dask client stand-in whose cluster gains workers after the sweep started."""

    def __init__(self) -> None:
        self.threads: dict[str, int] = {}

    def scheduler_info(self) -> dict:
        return {"workers": {key: {} for key in self.threads}}

    def nthreads(self) -> dict[str, int]:
        return dict(self.threads)


def test_dask_slots_follow_workers_that_join_later():
    # The executor needs the optional dask extra even with a stand-in client (it waits through
    # distributed.wait); without it this is a skip, as for the local-cluster test below.
    pytest.importorskip("distributed")
    client = _GrowingClient()
    executor = DaskExecutor(client=client, workers=2)
    assert executor.slots() == 2  # nobody has joined yet: the size asked for
    client.threads = {"tcp://a": 1, "tcp://b": 1, "tcp://c": 2}
    assert executor.slots() == 4


# --- the executors agree --------------------------------------------------------------------


def test_local_processes_give_the_same_results_as_serial(serial_run, tmp_path):
    with ProcessExecutor(workers=2) as executor:
        summary = run_sweep(build_config(SWEEP), tmp_path, executor, log=_quiet)
    assert (summary.done, summary.exit_code) == (4, 0)
    assert _outcomes(tmp_path) == _outcomes(serial_run)


def test_dask_local_cluster_gives_the_same_results_as_serial(serial_run, tmp_path):
    with dask_executor() as executor:
        assert executor.workers == 2
        summary = run_sweep(build_config(SWEEP), tmp_path, executor, log=_quiet)
    assert (summary.done, summary.exit_code) == (4, 0)
    assert _outcomes(tmp_path) == _outcomes(serial_run)


# --- the paper configs and reproduce --------------------------------------------------------


@pytest.mark.parametrize("dataset", ["gtsrb", "cifar10"])
def test_paper_configs_state_the_studys_setup(dataset):
    full = load_config(CONFIGS_DIR / f"paper-{dataset}.toml")
    small = load_config(CONFIGS_DIR / f"paper-{dataset}-small.toml")
    for config in (full, small):
        config.check_plugins()
        assert config.attack == "badnet"
        assert config.attack_params == {
            "patch_size": 3,
            "position": "bottom-right",
            "margin": 1,
            "pattern": "solid",
            "color": 255,
            "poison_rate": 0.1,
            "target_label": 0,
        }
        assert config.precisions == ["fp32", "int8-dynamic", "int8-static", "int4"]
        assert len(config.defenses) == 5 and config.clean_control
        assert config.eval_limit is None  # ASR over every non-target test image
    assert full.model == "resnet18" and len(full.seeds) >= 3
    assert small.data_root == full.data_root


def test_paper_configs_are_found_from_an_installed_package_run_in_a_checkout(tmp_path, monkeypatch):
    """``pip install .`` ships no configs beside the package; the Docker image runs from /app,
    which holds them: ``reproduce`` falls back to ./configs/grids, and says where it looked."""
    monkeypatch.setattr(harness.cli.sweep, "CONFIGS_DIR", tmp_path / "site-packages" / "configs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BlindspotsError, match=r"paper-gtsrb-small.toml not found in .* and "):
        paper_config_path("gtsrb", small=True)
    (tmp_path / "configs" / "grids").mkdir(parents=True)
    shutil.copy(CONFIGS_DIR / "paper-gtsrb-small.toml", tmp_path / "configs" / "grids")
    assert (
        paper_config_path("gtsrb", small=True)
        == Path("configs/grids/paper-gtsrb-small.toml").resolve()
    )


def test_reproduce_finds_the_data_file_in_a_folder(tmp_path):
    (tmp_path / "gtsrb32.npz").write_bytes(b"")
    (tmp_path / "cifar10_25k.npz").write_bytes(b"")
    picked = resolve_data_root(str(tmp_path), "../shared/data/gtsrb32.npz")
    assert picked == str(tmp_path / "gtsrb32.npz")
    assert resolve_data_root(str(tmp_path / "cifar10_25k.npz"), None).endswith("cifar10_25k.npz")
    with pytest.raises(BlindspotsError, match="does not exist"):
        resolve_data_root(str(tmp_path / "missing"), None)


def test_seeds_flag_selects_the_same_cells_a_full_run_would_fill(serial_run, tmp_path, capsys):
    """``--seeds 0`` of a two-seed config plans exactly the full run's seed-0 cells (done)."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    config_path = serial_run / "config.json"
    two_seeds = {**json.loads(config_path.read_text()), "seeds": [0, 1]}
    path = tmp_path / "two-seeds.json"
    path.write_text(json.dumps(two_seeds))
    args = parser.parse_args(["sweep", "plan", str(path), "--out", str(serial_run), "--seeds", "0"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 cells: 4 done, 0 pending, 0 failed"
    with pytest.raises(SystemExit):  # a repeated seed is a usage error, not a silent dedupe
        parser.parse_args(["sweep", "plan", str(path), "--seeds", "0,0"])
