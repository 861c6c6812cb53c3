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

from bge_ray.cluster import log
from bge_ray.storage import filesystem

REPORT_INTERVAL_S = 3.0
METRICS_FILE = "metrics.jsonl"


class ReportBuffer:
    """Log records of the optimizer steps since the last report (worker side)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.last_report = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def due(self) -> bool:
        """Whether enough time has passed for another report of log records alone."""
        return bool(self.records) and time.monotonic() - self.last_report >= REPORT_INTERVAL_S

    def take(self) -> dict[str, Any]:
        """The pending records, and the latest one's fields at the top level; the buffer empties."""
        records, self.records = self.records, []
        self.last_report = time.monotonic()
        latest = next((r for r in reversed(records) if r["kind"] == "train"), {})
        return {**{k: v for k, v in latest.items() if k != "kind"}, "records": records}


class DriverFeed(UserCallback):
    """On the Ray Train controller: every report (rank 0's metrics, all ranks report the same) and its
    checkpoint's path onto a queue the driver reads."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(dict(metrics[0], checkpoint_path=checkpoint.path if checkpoint else None))


def format_step(m: dict[str, Any], elapsed: float) -> str:
    """The console line of one log record."""
    done = m["step"] / m["total_steps"]
    eta = (elapsed / done - elapsed) if done > 0 else float("nan")
    grad = "n/a" if m["grad_norm"] is None or math.isnan(m["grad_norm"]) else f"{m['grad_norm']:.3f}"
    return (f"step {m['step']:>5}/{m['total_steps']} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
            f"lr {m['learning_rate']:.2e} | grad {grad} | {m['groups_per_s']:.2f} groups/s | "
            f"{m['tokens_per_s']:,.0f} tok/s | data wait {100 * m['data_wait_frac']:.1f}% | "
            f"elapsed {elapsed:,.0f}s | eta {eta:,.0f}s")


def format_eval(m: dict[str, Any]) -> str:
    """The console line of one validation."""
    metric = m["metric"]
    extra = "".join(f" | {k} {m['eval_' + k]:.4f}" for k in ("recall@100", "mrr@10") if "eval_" + k in m)
    base = f" (zero-shot {m['zero_shot_' + metric]:.4f})" if "zero_shot_" + metric in m else ""
    label = "zero-shot" if m["step"] == 0 else f"step {m['step']:>5}"
    return f"eval {label} | {metric} {m['eval_' + metric]:.4f}{base}{extra} | {m['eval_s']:.0f}s"


class RunLog:
    """The driver's record of a run: prints each report, keeps the history, writes ``metrics.jsonl``."""

    def __init__(self, launch_time: float, run_dir: str | None = None, resumed_at: int | None = None) -> None:
        self.launch_time = launch_time
        self.history: list[dict[str, Any]] = []
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

    def handle(self, report: dict[str, Any]) -> None:
        for record in report.get("records", []):
            if record["kind"] == "first_step":
                self._first_step(record)
            else:
                self.history.append(record)
                print(format_step(record, record["time"] - self.launch_time), flush=True)
            self.lines.append(json.dumps(record))
        if "eval_s" in report:  # a validation: its own report, or part of the final one
            record = {"kind": "eval", "step": report["step"], "metric": report["metric"],
                      "checkpoint_path": report.get("checkpoint_path"),
                      **{k: v for k, v in report.items() if k.startswith(("eval_", "zero_shot_"))}}
            self.evals.append(record)
            print(format_eval(record), flush=True)
            self.lines.append(json.dumps(record))
        if self.path and (report.get("records") or "eval_s" in report):
            self._write()

    def _first_step(self, m: dict[str, Any]) -> None:
        self.first_step = {"launch_to_first_step_s": m["time"] - self.launch_time,
                           "launch_to_workers_s": m["worker_start"] - self.launch_time}
        print(f"first optimizer step {self.first_step['launch_to_first_step_s']:.1f}s after launch (workers started "
              f"at {self.first_step['launch_to_workers_s']:.1f}s; model and engine ready {m['engine_ready_s']:.1f}s "
              f"later, first batch {m['first_batch_s']:.1f}s later)", flush=True)

    def _write(self) -> None:
        """The whole file again (object stores cannot append; it is small)."""
        fs, path = filesystem(self.path)
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(("\n".join(self.lines) + "\n").encode("utf-8"))


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
