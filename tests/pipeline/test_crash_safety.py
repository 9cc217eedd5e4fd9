"""Crash safety: a run killed at any moment resumes without losing or recomputing a finished cell.

Kills here are real ``SIGKILL``s of child processes (no ``finally`` runs, no buffers flush), at
the moments that used to break a rerun: mid-write of a file, mid-save of a model, mid-line of
``results.jsonl``, mid-rewrite of ``config.json``. A full disk is simulated by an ``os.write``
that fails with ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from harness.artifacts.preprocessing import Preprocessing
from harness.cli.app import main
from harness.core.atomic import (
    PARTIAL_MARK,
    atomic_target,
    atomic_write_json,
    atomic_write_text,
    remove_partials,
)
from harness.core.errors import BlindspotsError, ModelError
from harness.core.runlock import LOCK_NAME, RunLock
from harness.pipeline.store import ResultStore, cell_id
from harness.report.data import build_report
from harness.training.loop import (
    checkpoint_is_valid,
    load_model,
    save_state,
    set_aside_if_corrupt,
)
from harness.training.models import build_model

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 120


def _cell(seed: int = 0, poisoned: bool = True, **extra: Any) -> dict[str, Any]:
    """A finished-cell record as the runner writes it (the fields reports compute with)."""
    return {
        "dataset": "digits",
        "model": "small_cnn",
        "attack": "badnet",
        "seed": seed,
        "poisoned": poisoned,
        "precision": "fp32",
        "clean_acc": 0.9,
        "asr": 0.95 if poisoned else 0.05,
        "agreement_fp32": 1.0,
        "defenses": {"strip": {"status": "ok", "detected": True, "score": 1.5}},
        **extra,
    }


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    """A child Python running ``code``, its stdout readable line by line."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL


# --- atomic writes -------------------------------------------------------------------------


SLOW_WRITER = """
    import sys, time
    from harness.core.atomic import atomic_target
    with atomic_target(sys.argv[1]) as partial:
        with open(partial, "wb") as fh:
            while True:
                fh.write(b"n" * (1 << 20))
                fh.flush()
                print("writing", flush=True)
                time.sleep(0.05)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "config.json"
    target.write_text('{"old": true}\n')
    child = _python(SLOW_WRITER, str(target))
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    _kill(child)
    assert json.loads(target.read_text()) == {"old": True}
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size >= 1 << 20  # really mid-write
    assert remove_partials(tmp_path) == leftovers
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_writes_replace_whole_files_and_fail_without_a_trace(tmp_path):
    target = atomic_write_json(tmp_path / "deep" / "env.json", {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it
    with pytest.raises(ZeroDivisionError), atomic_target(target) as partial:
        partial.write_text("half")
        raise ZeroDivisionError  # a writer that fails: nothing of it may reach the target
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert sorted(target.parent.iterdir()) == [target]
    with atomic_target(tmp_path / "arrays.npz") as partial:
        assert partial.suffix == ".npz"  # so np.savez does not append a second .npz


def _full_disk(after_bytes: int = 0):
    """An ``os.write`` that writes ``after_bytes`` then fails like a full disk."""
    real_write = os.write
    budget = [after_bytes]

    def write(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= written
        return written

    return write


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", _full_disk(after_bytes=3))
        with pytest.raises(BlindspotsError) as info:
            atomic_write_text(target, "new content that does not fit")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_full_disk_during_a_result_append_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.append(_cell(seed=0))
    before = store.path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", _full_disk(after_bytes=40))  # half a line reaches the disk
        with pytest.raises(BlindspotsError, match="No space left on device") as info:
            store.append(_cell(seed=1))
    assert "\n" not in str(info.value) and str(store.path) in str(info.value)
    assert store.path.read_bytes() == before  # the partial line was cut off again
    store.append(_cell(seed=1))  # space freed: the rerun appends cleanly
    assert [r["seed"] for r in store.records()] == [0, 1]


# --- the result store ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b'{"dataset": "digits", "mod',  # killed mid-line
        b"\0" * 300,  # power loss: the size grew, the data never arrived
        b'{"dataset": "digits", "mo\n',  # a newline, but not a record
    ],
    ids=["mid-line", "nul-bytes", "broken-last-line"],
)
def test_a_torn_tail_is_cut_off_kept_aside_and_never_glued_to(tmp_path, caplog, tail):
    store = ResultStore(tmp_path)
    store.append(_cell(seed=0))
    store.append(_cell(seed=1))
    with store.path.open("ab") as fh:
        fh.write(tail)
    assert [r["seed"] for r in store.records()] == [0, 1]  # reading never modifies the file

    store.append(_cell(seed=2))  # the rerun's first append repairs first
    assert [r["seed"] for r in store.records()] == [0, 1, 2]
    assert store.path.read_bytes().endswith(b"\n")
    (torn,) = tmp_path.glob("results.jsonl.torn-*")
    assert torn.read_bytes() == tail
    assert any("torn last line" in m and torn.name in m for m in caplog.messages)


def test_repair_is_a_no_op_on_an_intact_store(tmp_path):
    store = ResultStore(tmp_path)
    assert store.repair() is None  # no file yet
    store.append(_cell())
    before = store.path.read_bytes()
    assert store.repair() is None
    assert store.path.read_bytes() == before
    assert not list(tmp_path.glob("*.torn-*"))


def test_damaged_and_duplicate_lines_are_skipped_with_a_warning_naming_the_line(tmp_path, caplog):
    first, copy = _cell(seed=0), _cell(seed=0, clean_acc=0.1)  # a second writer's copy
    lines = [
        json.dumps(first),
        "not json at all",
        "[1, 2]",
        json.dumps({"dataset": "digits", "asr": 1.0}),
        json.dumps(copy),
        json.dumps({**_cell(seed=3), "seed": "3"}),
        json.dumps(_cell(seed=4)),
    ]
    store = ResultStore(tmp_path)
    store.path.write_text("\n".join(lines) + "\n")
    records = store.records()
    assert records == [first, _cell(seed=4)]
    assert store.done() == {cell_id(first), cell_id(_cell(seed=4))}
    warnings = [m for m in caplog.messages if str(store.path) in m]
    assert any("line 2: not valid JSON" in m for m in warnings)
    assert any("line 3: a JSON list" in m for m in warnings)
    assert any("line 4: lacks model, attack, seed, poisoned, precision" in m for m in warnings)
    assert any("line 5 repeats cell" in m and "line 1" in m for m in warnings)
    assert any("line 6: 'seed'" in m for m in warnings)
    assert all("\n" not in m for m in warnings)
    store.records()
    assert len([m for m in caplog.messages if str(store.path) in m]) == len(warnings)  # once


def test_report_leaves_out_damaged_lines_and_files_in_one_line_each(tmp_path, caplog, capsys):
    good = _cell(seed=0)
    lines = [
        json.dumps(good),
        json.dumps({**_cell(seed=1), "asr": None}),  # identity intact, metrics not
        json.dumps({**_cell(seed=2), "defenses": {"strip": {"detected": True}}}),  # no status
        json.dumps(_cell(seed=0)),  # a second writer's copy: not a second seed
        '{"dataset": "dig',
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(lines))
    (tmp_path / "config.json").write_text("")  # what a kill mid-rewrite used to leave
    (tmp_path / "environment.json").write_text("[]")
    report = build_report(tmp_path)
    assert report["runs"] == [good]
    assert [row["n_seeds"] for row in report["summary"]] == [1]
    assert report["config"] == {} and report["environment"] == {}
    assert any("config.json is damaged (not valid JSON" in m for m in caplog.messages)
    assert any("environment.json is not a JSON object" in m for m in caplog.messages)
    assert any("line 2: 'asr'" in m for m in caplog.messages)
    assert any("line 3: lacks defenses.strip.status" in m for m in caplog.messages)

    assert main(["report", str(tmp_path)]) == 0  # the whole CLI path: no traceback
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((tmp_path / "report.json").read_text())["runs"] == [good]


# --- checkpoints ---------------------------------------------------------------------------


def _checkpoint(path: Path) -> Path:
    model = build_model("small_cnn", 10, 1)
    preprocessing = Preprocessing.from_images(np.arange(64, dtype=np.uint8).reshape(4, 4, 4, 1))
    meta = {"model": "small_cnn", "num_classes": 10, "in_channels": 1}
    return save_state(model, path, {**meta, "preprocessing": preprocessing.to_json()})


def test_a_truncated_checkpoint_is_named_and_a_cached_one_is_moved_aside(tmp_path):
    path = _checkpoint(tmp_path / "model.pt")
    assert checkpoint_is_valid(path) and set_aside_if_corrupt(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # what a kill mid-save used to leave

    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "truncated, damaged" in message
    assert not checkpoint_is_valid(path)

    aside = set_aside_if_corrupt(path)
    assert aside is not None and aside.name.startswith("model.pt.corrupt-")
    assert not path.exists() and aside.read_bytes() == whole[: len(whole) // 2]  # kept to inspect
    assert set_aside_if_corrupt(path) is None  # nothing left to move: the runner retrains
    _checkpoint(path)
    model, meta = load_model(path)
    assert meta["num_classes"] == 10 and not list(tmp_path.glob(".*partial*"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_save_state_writes_through_a_temporary_file(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "model.pt")
    before = path.read_bytes()
    seen: list[Path] = []

    def failing_save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(Path(target))
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(BlindspotsError, match=f"cannot write {path}: No space left on device"):
        _checkpoint(path)
    assert seen[0].parent == path.parent and seen[0] != path
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


# --- the run lock --------------------------------------------------------------------------


HOLDER = """
    import sys, time
    from harness.core.runlock import LOCK_NAME, RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
"""


def test_a_second_holder_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    folder = tmp_path / "run"
    holder = _python(HOLDER, str(folder))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlindspotsError) as info:
            RunLock(folder).acquire()
        assert str(info.value) == (
            f"{folder} is in use by another blindspots run (pid {holder.pid}); "
            "wait for it or use another --out"
        )
    finally:
        _kill(holder)
    with RunLock(folder) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held
        with pytest.raises(BlindspotsError, match=f"pid {os.getpid()}"):
            RunLock(folder).acquire()  # one run per folder, within one process too
    with RunLock(folder):
        pass  # released on exit


# --- end to end: `blindspots run` killed at the moments that used to break a rerun -----------


KILLED_RUN = """
    import os, signal, sys
    from pathlib import Path

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    moment = sys.argv[1]
    if moment == "model-save":  # the first checkpoint: half written, then killed
        import torch
        real_save = torch.save

        def save(obj, target, *args, **kwargs):
            real_save(obj, target, *args, **kwargs)
            os.truncate(target, os.path.getsize(target) // 2)
            die()

        torch.save = save
    elif moment == "second-result":  # the second results line: half written, then killed
        import harness.pipeline.store
        real_write_all = harness.pipeline.store.write_all
        lines = []

        def write_all(fd, data):
            lines.append(data)
            if len(lines) == 2:
                real_write_all(fd, data[: len(data) // 2])
                die()
            real_write_all(fd, data)

        harness.pipeline.store.write_all = write_all
    elif moment == "config-rewrite":  # the rerun's new config.json written, not yet renamed
        real_replace = os.replace

        def replace(src, dst, **kwargs):
            if Path(dst).name == "config.json":
                die()
            real_replace(src, dst, **kwargs)

        os.replace = replace

    from harness.cli.app import main

    sys.exit(main(sys.argv[2:]))
"""

TINY_RUN = """
dataset = "digits"
precisions = ["fp32"]
defenses = []
seeds = [0]
threads = 1
eval_limit = 200
calibration_size = 16
[training]
epochs = 1
batch_size = 64
"""

POISONED, CLEAN = (f"digits-small_cnn-badnet-s0-{kind}-fp32" for kind in ("poisoned", "clean"))


def _killed_run(out: Path, config: Path, moment: str) -> None:
    """``blindspots run`` in a child that SIGKILLs itself at ``moment``."""
    argv = [moment, "run", "--config", str(config), "--out", str(out)]
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RUN)
    return path


def test_sigkilled_runs_resume_without_losing_or_recomputing_a_cell(
    tmp_path, tiny_config, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = ["run", "--config", str(tiny_config), "--out", str(out)]
    _killed_run(out, tiny_config, "model-save")
    for state in out.rglob("model.pt"):  # the old code left half a model.pt here
        assert checkpoint_is_valid(state)

    _killed_run(out, tiny_config, "second-result")
    first_line = (out / "results.jsonl").read_bytes().split(b"\n")[0]
    assert [cell_id(r) for r in ResultStore(out).records()] == [POISONED]
    config_before = json.loads((out / "config.json").read_text())

    _killed_run(out, tiny_config, "config-rewrite")
    assert json.loads((out / "config.json").read_text()) == config_before

    with monkeypatch.context() as patch:  # the disk fills up at the next results line
        patch.setattr("harness.pipeline.store.write_all", _full_disk())
        assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"blindspots: error: cannot write {out / 'results.jsonl'}: No space left on device"
    )
    assert [cell_id(r) for r in ResultStore(out).records()] == [POISONED]

    assert main(argv) == 0  # space freed: the run completes
    log = capsys.readouterr().err
    assert log.count(f"skip {POISONED} (already in the store)") == 1  # finished: not recomputed
    assert f"{POISONED}: clean_acc" not in log
    assert log.count(f"{CLEAN}: clean_acc") == 1  # torn, then not written: computed once now
    assert "reusing trained poisoned model" in log and "reusing trained clean model" in log
    assert (out / "results.jsonl").read_bytes().split(b"\n")[0] == first_line  # not lost
    stored = ResultStore(out).records()
    assert [cell_id(r) for r in stored] == [POISONED, CLEAN]
    (torn,) = out.glob("results.jsonl.torn-*")  # the half line, kept aside
    assert json.dumps(stored[1], sort_keys=True).startswith(torn.read_text()[:40])
    report = json.loads((out / "report.json").read_text())
    assert sorted(cell_id(r) for r in report["runs"]) == [CLEAN, POISONED]
    assert not list(out.rglob(f".*{PARTIAL_MARK}*"))  # the killed writers' leftovers are gone

    (state,) = out.rglob("clean/model.pt")  # a cached model damaged on disk (old bug, bad disk)
    state.write_bytes(state.read_bytes()[:2048])
    assert main(argv) == 0  # no hand deletion needed: set aside and retrained
    (aside,) = state.parent.glob("model.pt.corrupt-*")
    assert aside.stat().st_size == 2048 and checkpoint_is_valid(state)
    assert "Traceback" not in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused_in_one_line(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    first = _python(HOLDER, str(out))  # holds the folder's lock as a running run does
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "locked"
        status = main(["run", "--config", str(tiny_config), "--out", str(out)])
    finally:
        _kill(first)
    assert status == 2
    assert capsys.readouterr().err == (
        f"blindspots: error: {out} is in use by another blindspots run (pid {first.pid}); "
        "wait for it or use another --out\n"
    )
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # refused before any work
