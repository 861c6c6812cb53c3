"""The one channel a run's measurements travel through.

Workers measure; every measurement leaves a worker once, through ``ray.train.report``:

* a **log record** every ``logging_steps`` (loss, learning rate, grad norm, throughput, data wait)
  and one at the first optimizer step (where start-up went). Records wait in a
  :class:`ReportBuffer` and leave together, at most every :data:`REPORT_INTERVAL_S` seconds (Ray
  Train's controller takes one report per worker per poll, every 2 s; reporting faster would stall
  training), and always with the next validation or checkpoint;
* a **validation** (``kind: eval``) at step 0 and every ``eval_steps``, with its checkpoint;
* a **checkpoint** (``kind: checkpoint``) every ``save_steps`` without ``eval_data``, and the
  **final** report (``kind: final``) with the run's summary.

Every report carries the latest log record's fields at its top level, so Ray Train callbacks and
Tune see the loss at each report. On the Train controller :class:`DriverFeed` (a Ray Train
``UserCallback``) hands each report to the driver, where :class:`RunLog` prints it, keeps the
history (``FinetuneResult.history``) and writes every record as one JSON line to
``metrics.jsonl`` in the run directory (a resumed run appends to it).
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from bge_ray.console import duration, log
from bge_ray.storage import filesystem
from bge_ray.train.trackers import scalars

REPORT_INTERVAL_S = 3.0
PROGRESS_INTERVAL_S = 15.0  # a progress line at least this often, whatever logging_steps is
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class ReportBuffer:
    """Records of the optimizer steps since the last report (worker side)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}  # the newest log record, whether or not it was reported yet
        self.last_report = self.last_line = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if record["kind"] in ("train", "progress"):
            self.last_line = time.monotonic()
        if record["kind"] == "train":
            self.latest = record

    def due(self) -> bool:
        """Whether enough time has passed for another report of log records alone."""
        return bool(self.records) and time.monotonic() - self.last_report >= REPORT_INTERVAL_S

    def progress_due(self) -> bool:
        """Whether the console has gone without a step line for too long."""
        return time.monotonic() - self.last_line >= PROGRESS_INTERVAL_S

    def take(self) -> dict[str, Any]:
        """The pending records, and the newest log record's fields at the top level (every report
        carries them, so a callback always sees the latest loss); the buffer empties."""
        records, self.records = self.records, []
        self.last_report = time.monotonic()
        return {**{k: v for k, v in self.latest.items() if k != "kind"}, "records": records}


class DriverFeed(UserCallback):
    """On the Ray Train controller: every report (rank 0's metrics, all ranks report the same) and its
    checkpoint's path onto a queue the driver reads."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(dict(metrics[0], checkpoint_path=checkpoint.path if checkpoint else None))


class Clock:
    """The ETA of this launch: the rate of the optimizer steps it trained, validation time left out, so
    it is right after a resume and while validations run."""

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None  # (time, step) of the first step this launch reported
        self.eval_s = 0.0

    def eta(self, step: int, total: int, now: float) -> float | None:
        if self.start is None:
            self.start = (now, step)
            return None
        t0, s0 = self.start
        busy = now - t0 - self.eval_s
        return (total - step) * busy / (step - s0) if step > s0 and busy > 0 else None


def format_step(m: dict[str, Any], elapsed: float, eta: float | None) -> str:
    """The console line of one log record."""
    grad = "n/a" if m["grad_norm"] is None or math.isnan(m["grad_norm"]) else f"{m['grad_norm']:.3f}"
    return (f"step {m['step']:>5}/{m['total_steps']} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
            f"lr {m['learning_rate']:.2e} | grad {grad} | {m['groups_per_s']:.2f} groups/s | "
            f"{m['tokens_per_s']:,.0f} tok/s | data wait {100 * m['data_wait_frac']:.1f}% | "
            f"elapsed {duration(elapsed)} | eta {'?' if eta is None else duration(eta)}")


def format_progress(m: dict[str, Any], elapsed: float, eta: float | None) -> str:
    """The console line between log records (``logging_steps`` apart)."""
    return (f"step {m['step']:>5}/{m['total_steps']} | epoch {m['epoch']:.2f} | elapsed {duration(elapsed)} | "
            f"eta {'?' if eta is None else duration(eta)}")


def format_eval(m: dict[str, Any]) -> str:
    """The console line of one validation."""
    metric = m["metric"]
    extra = "".join(f" | {k} {m['eval_' + k]:.4f}" for k in ("recall@100", "mrr@10") if "eval_" + k in m)
    base = f" (zero-shot {m['zero_shot_' + metric]:.4f})" if "zero_shot_" + metric in m else ""
    label = "zero-shot" if m["step"] == 0 else f"step {m['step']:>5}"
    head = metric.partition("_")[0]
    modes = [(mode, m[f"eval_{head}_{mode}"]) for mode in ("sparse", "colbert", "hybrid") if f"eval_{head}_{mode}" in m]
    if modes:  # BGE-M3: the metric in each retrieval mode
        extra += f" | {head} by mode dense:{m['eval_' + head]:.4f} " + " ".join(f"{k}:{v:.4f}" for k, v in modes)
    cuts = sorted(((int(k.rpartition("_dim")[2]), v) for k, v in m.items() if k.startswith(f"eval_{head}_dim")),
                  reverse=True)
    if cuts:  # Matryoshka: the metric at each cut
        whole = f"full:{m['eval_' + head]:.4f} " if "eval_" + head in m else ""
        extra += f" | {head} by dim {whole}" + " ".join(f"{d}:{v:.4f}" for d, v in cuts)
    return f"eval {label} | {metric} {m['eval_' + metric]:.4f}{base}{extra} | {m['eval_s']:.0f}s"


class RunLog:
    """The driver's record of a run: prints each report, writes it to the trackers and to
    ``metrics.jsonl`` (one JSON line per log record and validation), and at the end draws the curves."""

    def __init__(self, launch_time: float, run_dir: str | None = None, resumed_at: int | None = None,
                 trackers: list[Any] | None = None) -> None:
        self.launch_time = launch_time
        self.run_dir = run_dir
        self.trackers = trackers or []
        self.clock = Clock()
        self.evals: list[dict[str, Any]] = []
        self.first_step: dict[str, float] = {}
        self.path = f"{run_dir.rstrip('/')}/{METRICS_FILE}" if run_dir else None
        self.lines = self._earlier_lines(resumed_at) if self.path else []

    def _earlier_lines(self, resumed_at: int | None) -> list[str]:
        """The lines of the run this one resumes, up to the step it resumes from."""
        if resumed_at is None:
            return []
        fs, path = filesystem(self.path)
        try:
            with fs.open_input_stream(path) as f:
                lines = f.read().decode("utf-8").splitlines()
        except (FileNotFoundError, OSError):
            return []
        return [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resumed_at]

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every log record of the run, from its metrics file's lines (a resumed run's earlier ones too)."""
        return [r for r in map(json.loads, self.lines) if r["kind"] == "train"]

    def handle(self, report: dict[str, Any]) -> None:
        for record in report.get("records", []):
            self._record(record)
        if "eval_s" in report:  # a validation: its own report, or part of the final one
            record = {"kind": "eval", "step": report["step"], "metric": report["metric"],
                      "checkpoint_path": report.get("checkpoint_path"),
                      **{k: v for k, v in report.items() if k.startswith(("eval_", "zero_shot_"))}}
            self.clock.eval_s += report["eval_s"] if self.clock.start else 0.0
            self.evals.append(record)
            print(format_eval(record), flush=True)
            self._keep(record)
        if self.path and (report.get("records") or "eval_s" in report):
            self._write()

    def _record(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "message":
            log(record["text"])
        elif kind == "first_step":
            self._first_step(record)
            self.lines.append(json.dumps(record))  # where start-up went, kept with the run
        elif kind == "progress":
            eta = self.clock.eta(record["step"], record["total_steps"], record["time"])
            print(format_progress(record, record["time"] - self.launch_time, eta), flush=True)
        else:  # elapsed: when the step was trained (records can arrive a few seconds later, several at once)
            eta = self.clock.eta(record["step"], record["total_steps"], record["time"])
            print(format_step(record, record["time"] - self.launch_time, eta), flush=True)
            self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, int(record["step"]))

    def _first_step(self, m: dict[str, Any]) -> None:
        self.first_step = {"launch_to_first_step_s": m["time"] - self.launch_time,
                           "launch_to_workers_s": m["worker_start"] - self.launch_time}
        self.clock.start = (m["time"], m["step"])
        print(f"first optimizer step {self.first_step['launch_to_first_step_s']:.1f}s after launch (workers started "
              f"at {self.first_step['launch_to_workers_s']:.1f}s; model and engine ready {m['engine_ready_s']:.1f}s "
              f"later, first batch {m['first_batch_s']:.1f}s later)", flush=True)

    def _write(self) -> None:
        """The whole file again (object stores cannot append; it is small)."""
        fs, path = filesystem(self.path)
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(("\n".join(self.lines) + "\n").encode("utf-8"))

    def finish(self) -> str | None:
        """Close the trackers; draw the curves into the run folder (``curves.png``); its path."""
        for tracker in self.trackers:
            tracker.close()
        if not self.run_dir or not self.lines:
            return None
        return plot_curves([json.loads(line) for line in self.lines], f"{self.run_dir.rstrip('/')}/{CURVES_FILE}")


def plot_curves(records: list[dict[str, Any]], path: str) -> str:
    """Loss, learning rate and the validation metric against optimizer steps, side by side, in a PNG."""
    import matplotlib  # only here: the rest of bge-ray does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in ((axes[0], "loss", "training loss"), (axes[1], "learning_rate", "learning rate")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], marker=".")
        ax.set_title(label)
    if evals:
        metric = evals[0]["metric"]
        axes[2].plot([r["step"] for r in evals], [r[f"eval_{metric}"] for r in evals], marker="o")
        axes[2].set_title(f"validation {metric}")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fs, local = filesystem(path)
    with fs.open_output_stream(local) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return path


class QueueReader(threading.Thread):
    """Hands each report arriving on ``queue`` to a :class:`RunLog`, until stopped; then what is left."""

    def __init__(self, queue: Queue, run_log: RunLog) -> None:
        super().__init__(daemon=True)
        self.queue, self.run_log = queue, run_log
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    item = self.queue.get(timeout=0.5)
                except Empty:
                    continue
                self.run_log.handle(item)
        except BaseException as e:  # progress output must not kill a run; finetune() reports it
            self.error = e

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        if self.error is not None:
            log(f"progress display failed: {type(self.error).__name__}: {self.error}")
        while not self.queue.empty():  # what arrived after the last look
            self.run_log.handle(self.queue.get_nowait())
