"""Progress of a loop over epochs of batches: a live bar on a terminal, plain log lines elsewhere.

A training epoch on CIFAR-10 takes minutes on a CPU, so a report that moves only at epoch ends
looks hung. On a terminal a tqdm bar advances per batch with its rate and ETA. Where stderr is
not a terminal (CI logs, redirected files, sweep workers) carriage-return redraws would turn
into thousands of lines of garbage, so :class:`LineProgress` prints whole timestamped lines
instead, at most one per ``interval`` seconds, plus the end of every epoch that itself took
that long, plus the last epoch's end. A fast loop (the digits demo trains an epoch in a second)
thus logs a line every ``interval`` and its result, not one line per epoch.

Reporters only read the numbers the loop hands them and the clock: they never touch an RNG or
a tensor, so a run's results are the same with progress shown, logged or silenced.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Literal, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 30.0
"""Fewest seconds between two lines of :class:`LineProgress`, unless an epoch this long (or the
last epoch) ends."""

Metrics = Mapping[str, float]


def format_duration(seconds: float) -> str:
    """``45s``, ``1m12s``, ``2h03m``: short enough for a log line, exact enough for an ETA."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_metrics(metrics: Metrics) -> str:
    """``loss 0.410 acc 0.913`` (three decimals: enough to see a loss move between lines)."""
    return " ".join(f"{name} {value:.3f}" for name, value in metrics.items())


class Progress:
    """Silent reporter and the interface of the others (``progress=False`` / library use).

    The loop calls :meth:`begin` once, :meth:`batch` after every batch, :meth:`epoch_end` after
    every epoch and :meth:`close` at the end. ``epoch`` is the 0-based index of the current
    epoch; ``batch`` the number of batches finished in it.
    """

    def begin(self, epochs: int, batches_per_epoch: int) -> None:
        """Announce the size of the loop (needed for totals and the ETA)."""

    def batch(self, epoch: int, batch: int, metrics: Metrics) -> None:
        """One more batch done; ``metrics`` are running values of the current epoch."""

    def epoch_end(self, epoch: int, metrics: Metrics) -> None:
        """Epoch ``epoch`` finished; ``metrics`` are its final values."""

    def close(self) -> None:
        """The loop ended (also after an exception); release the terminal."""


class LineProgress(Progress):
    """Timestamped whole lines, rate-limited: for logs, files and non-terminal stderr.

    ``clock`` measures intervals and the ETA (monotonic seconds); ``stamp`` gives the
    wall-clock prefix. Both are injectable so tests need no sleeps.
    """

    def __init__(
        self,
        desc: str,
        stream: TextIO | None = None,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[], str] = lambda: datetime.now().strftime("%H:%M:%S"),
    ) -> None:
        self.desc = desc
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.stamp = stamp
        self.epochs = 0
        self.batches_per_epoch = 0
        self._started = 0.0
        self._last_line = 0.0
        self._epoch_started = 0.0

    def begin(self, epochs: int, batches_per_epoch: int) -> None:
        self.epochs, self.batches_per_epoch = epochs, batches_per_epoch
        self._started = self._last_line = self._epoch_started = self.clock()

    def batch(self, epoch: int, batch: int, metrics: Metrics) -> None:
        now = self.clock()
        if now - self._last_line < self.interval or batch >= self.batches_per_epoch:
            return  # too soon, or the epoch-end line follows at once
        self._last_line = now
        position = f"batch {batch}/{self.batches_per_epoch}"
        self._emit(epoch, position, metrics, self._done(epoch, batch), now)

    def epoch_end(self, epoch: int, metrics: Metrics) -> None:
        now = self.clock()
        long_epoch = now - self._epoch_started >= self.interval
        self._epoch_started = now
        due = now - self._last_line >= self.interval
        if not (long_epoch or due or epoch + 1 >= self.epochs):
            return
        self._last_line = now
        done = self._done(epoch, self.batches_per_epoch)
        self._emit(epoch, "done", metrics, done, now)

    def _done(self, epoch: int, batch: int) -> int:
        return epoch * self.batches_per_epoch + batch

    def _emit(self, epoch: int, position: str, metrics: Metrics, done: int, now: float) -> None:
        elapsed = now - self._started
        total = self.epochs * self.batches_per_epoch
        parts = [f"epoch {epoch + 1}/{self.epochs}", position]
        if metrics:
            parts.append(format_metrics(metrics))
        timed = done > 0 and elapsed > 0
        if timed:
            parts.append(f"{done / elapsed:.1f} batch/s")
        if done >= total:
            parts.append(f"in {format_duration(elapsed)}")
        elif timed:
            parts.append(f"eta {format_duration(elapsed / done * (total - done))}")
        line = f"{self.stamp()} {self.desc}: {' '.join(parts)}"
        print(line, file=self.stream or sys.stderr, flush=True)


class BarProgress(Progress):
    """A tqdm bar over all batches of all epochs (rate and ETA are tqdm's), for a terminal."""

    def __init__(self, desc: str, stream: TextIO | None = None) -> None:
        self.desc = desc
        self.stream = stream
        self.epochs = 0
        self._bar: tqdm | None = None

    def begin(self, epochs: int, batches_per_epoch: int) -> None:
        self.epochs = epochs
        self._bar = tqdm(
            total=epochs * batches_per_epoch,
            desc=self._label(0),
            unit="batch",
            file=self.stream or sys.stderr,
            dynamic_ncols=True,
            disable=False,  # tqdm's own auto-disable would hide the bar we were asked for
        )

    def _label(self, epoch: int) -> str:
        return f"{self.desc} epoch {epoch + 1}/{self.epochs}"

    def batch(self, epoch: int, batch: int, metrics: Metrics) -> None:
        if self._bar is None:
            return
        if batch == 1:
            self._bar.set_description_str(self._label(epoch), refresh=False)
        self._bar.set_postfix_str(format_metrics(metrics), refresh=False)
        self._bar.update(1)  # redraws at most every tqdm mininterval (0.1 s)

    def epoch_end(self, epoch: int, metrics: Metrics) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(format_metrics(metrics), refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


ProgressMode = bool | Literal["lines"]
"""``True``: bar on a terminal, lines elsewhere; ``"lines"``: always lines; ``False``: silent."""


def progress_for(desc: str, enabled: ProgressMode = True, stream: TextIO | None = None) -> Progress:
    """The reporter that suits ``stream`` (default stderr): bar on a terminal, lines otherwise.

    ``enabled=False`` gives the silent :class:`Progress` (tests, library use). ``"lines"`` never
    draws a bar: parallel sweep workers share the driver's terminal, where two redrawn bars
    would overwrite each other, while whole lines that name their model interleave cleanly.
    """
    if enabled is False:
        return Progress()
    target = stream or sys.stderr
    isatty = getattr(target, "isatty", None)
    if enabled is True and callable(isatty) and isatty():
        return BarProgress(desc, stream)
    return LineProgress(desc, stream)
