"""Progress reporting: timestamped, rate-limited plain lines off a terminal, a per-batch bar on
one, silence on request, and the same trained weights whichever is used."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from harness.artifacts.preprocessing import Preprocessing
from harness.core.progress import (
    BarProgress,
    LineProgress,
    Progress,
    format_duration,
    progress_for,
)
from harness.training.loop import TrainConfig, train_model

STAMP = r"\d\d:\d\d:\d\d"


class FakeClock:
    """Monotonic seconds that advance only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    """A captured stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _run(reporter: Progress, clock: FakeClock, epochs: int, batches: int, step_s: float) -> None:
    reporter.begin(epochs, batches)
    for epoch in range(epochs):
        for batch in range(1, batches + 1):
            clock.now += step_s
            reporter.batch(epoch, batch, {"loss": 0.5})
        reporter.epoch_end(epoch, {"loss": 0.5, "acc": 0.75})
    reporter.close()


def test_plain_lines_carry_time_position_loss_and_eta_without_carriage_returns():
    clock, out = FakeClock(), io.StringIO()
    reporter = LineProgress("train seed 0 poisoned", out, interval=10.0, clock=clock)
    _run(reporter, clock, epochs=3, batches=100, step_s=1.0)
    text = out.getvalue()
    assert "\r" not in text
    lines = _lines(out)
    assert all(re.match(rf"{STAMP} train seed 0 poisoned: epoch \d/3 ", line) for line in lines)
    # 10 s at 1 batch/s: 290 batches left of 300 → 4m50s.
    assert lines[0].endswith("epoch 1/3 batch 10/100 loss 0.500 1.0 batch/s eta 4m50s")
    assert "epoch 1/3 done loss 0.500 acc 0.750 1.0 batch/s eta 3m20s" in lines[9]
    assert lines[-1].endswith("epoch 3/3 done loss 0.500 acc 0.750 1.0 batch/s in 5m00s")


def test_plain_lines_are_rate_limited_but_long_epochs_and_the_last_one_report_their_end():
    clock, out = FakeClock(), io.StringIO()
    reporter = LineProgress("t", out, interval=10.0, clock=clock)
    _run(reporter, clock, epochs=4, batches=25, step_s=1.0)
    lines = _lines(out)
    ends = [line for line in lines if " done " in line]
    batch_lines = [line for line in lines if " batch " in line and " done " not in line]
    assert len(ends) == 4
    # Per 25-second epoch: lines at 10 s and 20 s; the epoch end restarts the interval.
    assert len(batch_lines) == 8
    assert [int(re.search(r"batch (\d+)/", line)[1]) for line in batch_lines[:2]] == [10, 20]

    # A slow loop (60 s per batch) prints each batch; a fast one (1 ms) only its last epoch end.
    slow, fast = io.StringIO(), io.StringIO()
    slow_clock, fast_clock = FakeClock(), FakeClock()
    _run(LineProgress("t", slow, 30.0, slow_clock), slow_clock, 1, 3, step_s=60.0)
    _run(LineProgress("t", fast, 30.0, fast_clock), fast_clock, 2, 500, step_s=0.001)
    assert len(_lines(slow)) == 3  # batches 1 and 2, then the epoch end (not batch 3 twice)
    assert len(_lines(fast)) == 1
    assert " epoch 2/2 done " in _lines(fast)[0]


def test_fast_epochs_log_one_line_per_interval_and_the_result():
    # 40 one-second epochs (the digits demo's pace) at a 10 s interval: an epoch-end line when
    # one is due (every 10 s), and the last epoch's line with its total time.
    clock, out = FakeClock(), io.StringIO()
    _run(LineProgress("t", out, 10.0, clock), clock, epochs=40, batches=8, step_s=0.125)
    lines = _lines(out)
    assert [re.search(r"epoch (\d+)/40", line)[1] for line in lines] == ["10", "20", "30", "40"]
    assert lines[-1].endswith("in 40s")


def test_silenced_progress_prints_nothing(capfd):
    reporter = progress_for("quiet", enabled=False)
    assert type(reporter) is Progress
    _run(reporter, FakeClock(), epochs=2, batches=5, step_s=100.0)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_terminal_gets_a_bar_everything_else_gets_lines():
    assert isinstance(progress_for("d", stream=TtyStream()), BarProgress)
    assert isinstance(progress_for("d", stream=io.StringIO()), LineProgress)
    # Parallel sweep workers share the driver's terminal: lines there, never two redrawn bars.
    assert isinstance(progress_for("d", "lines", stream=TtyStream()), LineProgress)

    out = TtyStream()
    bar = progress_for("train s0", stream=out)
    bar.begin(2, 4)
    for epoch in range(2):
        for batch in range(1, 5):
            bar.batch(epoch, batch, {"loss": 1.25})
        bar.epoch_end(epoch, {"loss": 1.25, "acc": 0.5})
    bar.close()
    final = out.getvalue().split("\r")[-1]
    assert "train s0 epoch 2/2" in final
    assert "8/8" in final and "batch/s" in final and "loss 1.250 acc 0.500" in final


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 72, 3600 + 180 + 59)] == [
        "0s",
        "45s",
        "1m12s",
        "1h03m",
    ]


@pytest.fixture(scope="module")
def tiny_digits():
    raw = load_digits()
    x = np.rint(raw.images[:200] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return x, raw.target[:200].astype(np.int64), Preprocessing.from_images(x)


CONFIG = TrainConfig(epochs=2, batch_size=32, seed=3, num_threads=1, augment=True)


def test_training_reports_every_batch_and_weights_match_silent_training(tiny_digits, capfd):
    x, y, preprocessing = tiny_digits
    silent = train_model(x, y, 10, preprocessing, CONFIG, progress=False)
    assert capfd.readouterr().err == ""

    clock, lines = FakeClock(), io.StringIO()

    def ticking() -> float:
        clock.now += 1.0
        return clock.now

    logged = train_model(
        x, y, 10, preprocessing, CONFIG, progress=LineProgress("train", lines, 0.0, ticking)
    )
    bar = train_model(x, y, 10, preprocessing, CONFIG, progress=BarProgress("train", TtyStream()))

    # 200 images at 32: 6 full batches and one of 8 per epoch; with no rate limit each batch is
    # reported, the last one of an epoch by its epoch-end line.
    reported = _lines(lines)
    assert len(reported) == 2 * 7
    positions = [re.search(r"epoch \d/2 (batch \d/7|done)", line)[0] for line in reported]
    assert positions[5:8] == ["epoch 1/2 batch 6/7", "epoch 1/2 done", "epoch 2/2 batch 1/7"]
    assert re.match(
        rf"{STAMP} train: epoch 1/2 batch 1/7 loss \d\.\d{{3}} .* eta \d+s$", reported[0]
    )
    assert "\r" not in lines.getvalue()

    reference = silent.state_dict()
    for other in (logged, bar):
        state = other.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_training_on_non_terminal_stderr_logs_plain_lines(tiny_digits, capsys):
    x, y, preprocessing = tiny_digits
    train_model(x, y, 10, preprocessing, CONFIG.model_copy(update={"epochs": 1}), desc="train s3")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.fullmatch(rf"{STAMP} train s3: epoch 1/1 done loss \S+ acc \S+ .* in \d+s\n", err)
