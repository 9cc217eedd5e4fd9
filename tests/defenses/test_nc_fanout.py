"""Neural Cleanse's labels fanned out over the sweep's executors (issue 20, item 1).

The schedule stays in the driver and each step's labels run as tasks wherever the injected
:class:`~defenses.fanout.LabelMap` puts them; the scan must come out bit-identical to the serial
one — masks, patterns, norms, steps, statuses and verdicts — in this process, on local worker
processes and on a Dask cluster, with a toy forward and with the deployed graph's replica.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from defenses.base import DefenseData
from defenses.fanout import SerialLabelMap
from defenses.neural_cleanse import (
    NeuralCleanseParams,
    ReversedTriggers,
    TriggerSearch,
    _Label,
    remote_label_step,
    reverse_engineer,
)
from harness.core.errors import BlindspotsError, ModelError
from harness.pipeline.evaluate import run_defense
from harness.pipeline.executors import (
    ProcessExecutor,
    SerialExecutor,
    _chunks,
    resolve_shared,
)
from harness.runtime.adapter import RuntimeAdapter
from tests.conftest import dask_executor


def _tiny_forward() -> torch.nn.Module:
    """A picklable forward (torch's own classes: a spawned worker can rebuild it)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)
    ).eval()


IMAGES = np.random.default_rng(3).integers(0, 256, size=(24, 4, 4, 1)).astype(np.uint8)
PARAMS = NeuralCleanseParams(
    n_samples=24,
    batch_size=8,
    steps=60,
    patience=2,
    early_stop_patience=3,
    init_cost=0.1,
    attack_success_threshold=0.8,
    torch_threads=1,
)


def _scan(label_map=None) -> ReversedTriggers:
    return reverse_engineer(_tiny_forward(), IMAGES, 5, PARAMS, seed=7, label_map=label_map)


def _assert_identical(a: ReversedTriggers, b: ReversedTriggers) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, other, err_msg=name)
            assert value.dtype == other.dtype, name
        else:
            assert value == other, name


@pytest.fixture(scope="module")
def serial_scan() -> ReversedTriggers:
    scan = _scan()
    # the toy scan exercises the schedule: costs move, labels stop at different steps
    assert len(set(scan.steps_run.tolist())) > 1 and scan.reached.any()
    return scan


# ---------------------------------------------------------------------------- label state
def test_a_restored_label_continues_bit_for_bit():
    search = TriggerSearch(_tiny_forward(), IMAGES, 5, PARAMS, seed=1)
    for _ in range(3):
        search.step(np.arange(5))
    twin = _Label.restore(pickle.loads(pickle.dumps(search.state[2].snapshot())), PARAMS)
    outcome, after = remote_label_step(search.scan, (2, search.state[2].snapshot(), 0.01))
    search.schedule.cost[2] = 0.01
    expected = search._label_step(2)
    assert (outcome.success, outcome.reg, outcome.saturated) == (
        expected.success,
        expected.reg,
        expected.saturated,
    )
    moved = _Label.restore(after, PARAMS)
    assert torch.equal(moved.mask_param, search.state[2].mask_param)
    assert torch.equal(moved.pattern_param, search.state[2].pattern_param)
    assert all(torch.equal(x, y) for x, y in zip(moved.adam.v, search.state[2].adam.v, strict=True))
    assert torch.equal(moved.generator.get_state(), search.state[2].generator.get_state())
    assert not torch.equal(twin.mask_param, moved.mask_param)  # the snapshot was a copy


# ---------------------------------------------------------------------------- executors
def test_chunks_are_contiguous_and_balanced():
    assert _chunks(list(range(7)), 3) == [(0, [0, 1, 2]), (1, [3, 4]), (2, [5, 6])]
    assert _chunks([1, 2], 5) == [(0, [1]), (1, [2])]
    assert _chunks([], 2) == []


def _add(shared: int, item: int) -> int:
    if item < 0:
        raise ValueError(f"negative item {item}")
    return shared + item


def test_the_executor_label_map_keeps_order_and_reraises():
    with ProcessExecutor(workers=2) as executor:
        tasks = executor.label_map().open(100)
        assert tasks.map(_add, list(range(9))) == list(range(100, 109))
        with pytest.raises(ValueError, match="negative item -1"):
            tasks.map(_add, [1, -1, 2])
        tasks.close()
        tasks.close()  # idempotent
        with pytest.raises(BlindspotsError, match="closed"):
            tasks.map(_add, [1])


def test_a_pickled_oracle_has_no_parity(digits_world):
    oracle = RuntimeAdapter.from_path(digits_world.poisoned["int8-static"]).gradient_oracle()
    copy = pickle.loads(pickle.dumps(oracle))
    pixels = digits_world.x_test[:8].astype(np.float32)
    assert torch.equal(copy.logits(pixels), oracle.logits(pixels))
    with pytest.raises(ModelError, match="pickled gradient oracle"):
        copy.parity(digits_world.x_test[:8])


# ---------------------------------------------------------------------------- bit-identity
def test_serial_label_map_is_the_serial_scan(serial_scan):
    _assert_identical(_scan(SerialLabelMap()), serial_scan)
    _assert_identical(_scan(SerialExecutor().label_map()), serial_scan)


def test_local_processes_give_the_serial_scan(serial_scan):
    with ProcessExecutor(workers=2) as executor:
        _assert_identical(_scan(executor.label_map()), serial_scan)


def test_a_dask_cluster_gives_the_serial_scan(serial_scan):
    with dask_executor() as executor:
        _assert_identical(_scan(executor.label_map()), serial_scan)


def test_the_deployed_replica_fans_out_to_the_same_verdict(digits_world):
    """The real thing: the int8 graph's replica shipped to worker processes (oracle pickled)."""
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["int8-static"])
    params = {"profile": "fast", "steps": 12, "torch_threads": 1}

    def scan(label_map):
        data = DefenseData(
            num_classes=10,
            clean_x=digits_world.x_test,
            clean_y=digits_world.y_test,
            target_label=digits_world.target,
            label_map=label_map,
        )
        return run_defense("neural_cleanse", params, 0, adapter, data)

    serial = scan(None)
    with ProcessExecutor(workers=2) as executor:
        fanned = scan(executor.label_map())
    assert serial.status == fanned.status == "ok"
    assert serial.details.pop("label_tasks") == "in process"
    assert fanned.details.pop("label_tasks") == "processes (2 workers)"
    assert fanned.details == serial.details
    assert (fanned.verdict, fanned.flagged_labels) == (serial.verdict, serial.flagged_labels)
    for name, array in serial.arrays.items():
        np.testing.assert_array_equal(fanned.arrays[name], array)


def test_shared_handles_resolve_where_the_task_runs(tmp_path):
    with ProcessExecutor(workers=1) as executor:
        handle = executor.share({"a": 1})
        assert resolve_shared(handle) == {"a": 1}
        executor.unshare(handle)
        executor.unshare(handle)  # idempotent
    assert resolve_shared(SerialExecutor().share("x")) == "x"


# ---------------------------------------------------------------------------- sweeps
NC_SWEEP = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    "attack_params": {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 1, "batch_size": 64},
    "seeds": [0],
    "precisions": ["int8-static"],
    "defenses": ["neural_cleanse"],
    "defense_params": {"neural_cleanse": {"profile": "fast", "steps": 8, "torch_threads": 1}},
    "threads": 1,
}


def _nc_details(folder) -> dict[str, dict]:
    from harness.pipeline.store import ResultStore

    return {
        r["cell"]: {k: v for k, v in r["defenses"]["neural_cleanse"].items() if "time" not in k}
        for r in ResultStore(folder).records()
    }


def test_a_dask_sweep_spreads_a_cells_labels_and_matches_serial(tmp_path):
    """On Dask, each cell's Neural Cleanse runs its labels as tasks on the same cluster (through
    the worker's client, seceded); the records equal a serial sweep's."""
    from harness.pipeline.config import build_config
    from harness.pipeline.sweep import run_sweep

    config = build_config(NC_SWEEP)
    serial = run_sweep(config, tmp_path / "serial", SerialExecutor(1), log=lambda _: None)
    assert serial.exit_code == 0
    with dask_executor() as executor:
        fanned = run_sweep(config, tmp_path / "dask", executor, log=lambda _: None)
    assert fanned.exit_code == 0
    fanned_nc, serial_nc = _nc_details(tmp_path / "dask"), _nc_details(tmp_path / "serial")
    for cell, serial_result in serial_nc.items():
        assert serial_result["status"] == "ok"
        assert serial_result["details"].pop("label_tasks") == "in process"
        assert fanned_nc[cell]["details"].pop("label_tasks") == "dask (2 workers)"
    assert fanned_nc == serial_nc


# ---------------------------------------------------------------------------- the bench
def test_the_fanout_bench_compares_each_run_with_serial(digits_world, tmp_path, monkeypatch):
    import json
    import shutil

    import bench.defenses.bench_nc_fanout as bench

    folder = tmp_path / "digits"
    folder.mkdir()
    shutil.copy(digits_world.poisoned["int8-static"], folder / "int8-static.onnx")
    np.savez(folder / "clean.npz", x=digits_world.x_test, y=digits_world.y_test, num_classes=10)
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    out = tmp_path / "report.json"
    argv = ["--runs", "serial,processes:1", "--params", '{"profile": "fast", "steps": 3}']
    assert bench.main([*argv, "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in runs] == ["serial", "processes:1"]
    assert all(r["identical"] and r["steps_total"] == 30 for r in runs)
    with pytest.raises(BlindspotsError, match="unknown run 'threads:2'"):
        bench.main([*argv, "--runs", "serial,threads:2"])


def test_progress_lines_name_every_label_once_and_change_nothing(serial_scan):
    """Per-label progress (issue 18 item 4): one line per finished label, in a scan that is
    bit-identical to the silent one — the reporter reads counters and the clock only."""
    lines: list[str] = []
    reported = reverse_engineer(_tiny_forward(), IMAGES, 5, PARAMS, seed=7, progress=lines.append)
    _assert_identical(serial_scan, reported)
    done = [line for line in lines if " done after " in line]
    assert sorted(int(line.split()[2]) for line in done) == list(range(5))
    for line in done:
        label = int(line.split()[2])
        assert f"after {serial_scan.steps_run[label]} steps" in line
    assert done[-1].endswith(tuple(f"5/5 labels done, {s}s" for s in range(60)))


def test_progress_heartbeat_comes_when_no_label_finishes_for_a_while():
    from defenses.neural_cleanse import ScanProgress

    class Search:  # the counters ScanProgress reads
        done = np.array([True, False, False])
        paused = np.array([False, True, False])
        steps_run = np.array([4, 2, 9])

        def norms(self) -> np.ndarray:
            return np.array([3.0, 5.0, 6.0])

        reached = np.array([True, False, False])

    now = [0.0]
    lines: list[str] = []
    progress = ScanProgress(lines.append, 3, heartbeat_s=60.0, clock=lambda: now[0])
    progress.after_step(Search())  # type: ignore[arg-type]
    assert lines == [
        "neural_cleanse: label 0 done after 4 steps (mask L1 3.0, reached the success bar); "
        "1/3 labels done, 0s"
    ]
    now[0] = 30.0
    progress.after_step(Search())  # type: ignore[arg-type]
    assert len(lines) == 1  # nothing new, no heartbeat due
    now[0] = 61.0
    progress.after_step(Search())  # type: ignore[arg-type]
    assert lines[-1] == (
        "neural_cleanse: 1 label(s) running (up to step 9), 1 waiting, 1/3 done, 1m01s"
    )
    ScanProgress(None, 3).after_step(Search())  # type: ignore[arg-type]  # silent: no sink
