"""What bge-ray prints: its own ``[bge-ray]`` lines, and progress lines for every phase that takes
more than a few seconds (done / total, rate, ETA), at a cadence a job log can hold."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import ray

PROGRESS_EVERY_S = 15.0


def log(msg: str) -> None:
    """One line of bge-ray's own progress, on stderr."""
    print(f"[bge-ray] {msg}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """``label: 1,234/5,000 passages (25%) | 41.2/s | eta 1m31s`` every ``every_s`` seconds while a phase
    runs (a thread prints it, whatever the pace of the work), and a closing line.

    Counts come from :meth:`add`, or, for work that runs elsewhere, from ``count_fn`` (a
    :class:`ProgressCounter` actor's ``value``). Use as a context manager, or :meth:`start` / :meth:`done`.
    """

    def __init__(self, label: str, total: int | None, unit: str, every_s: float = PROGRESS_EVERY_S,
                 count_fn: Any = None, quiet_below_s: float = 0.0) -> None:
        self.label, self.total, self.unit, self.every_s, self.count_fn = label, total, unit, every_s, count_fn
        self.quiet_below_s = quiet_below_s  # no closing line for a phase this short (it printed nothing either)
        self.count = 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else None
            return (f"{self.label}: {self.count:,}/{self.total:,} {self.unit} ({100 * self.count / self.total:.0f}%) | "
                    f"{rate:,.1f}/s | eta {'?' if eta is None else duration(eta)}")
        return f"{self.label}: {self.count:,} {self.unit} | {rate:,.1f}/s | {duration(elapsed)}"

    def add(self, n: int) -> None:
        self.count += n

    def _poll(self) -> None:
        if self.count_fn is not None:
            try:
                self.count = int(self.count_fn())
            except Exception:  # noqa: BLE001 - progress must never fail a job
                return

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self._poll()
            log(self.line())

    def start(self) -> ProgressLine:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()
        return self

    def done(self) -> None:
        """Stop the ticker and print the closing line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._poll()
        elapsed = time.monotonic() - self.t0
        if elapsed < self.quiet_below_s:
            return
        log(f"{self.label}: {self.count:,} {self.unit} in {duration(elapsed)} "
            f"({self.count / elapsed if elapsed > 0 else 0:,.1f}/s)")

    def __enter__(self) -> ProgressLine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.done()


class ProgressCounter:
    """A Ray actor that tasks and actors of a pipeline add their counts to (``counter.add.remote(n)``)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def value(self) -> int:
        return self.count


def counter_progress(label: str, total: int | None, unit: str, counter: Any) -> ProgressLine:
    """A :class:`ProgressLine` that reads a :class:`ProgressCounter` actor."""
    return ProgressLine(label, total, unit, count_fn=lambda: ray.get(counter.value.remote(), timeout=10))
