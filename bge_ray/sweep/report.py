"""What a sweep reports: one row per trial, the best model and config, tables and a plot."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import yaml
from ray.train import Checkpoint

from bge_ray.config.finetune import FinetuneConfig
from bge_ray.config.parse import build_config
from bge_ray.storage import publish_model
from bge_ray.sweep.space import SweepConfig
from bge_ray.train.recipe import MODEL_SUBDIR


def collect_trials(grid: Any, sweep: SweepConfig, metric: str) -> list[dict[str, Any]]:
    """One row per trial: its values, best and last validation, whether it finished, was stopped or failed."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        # the validations that took a checkpoint (every report carries the latest metric; see SweepReportCallback)
        history = [] if df is None or metric not in df.columns or "checkpoint_path" not in df.columns else [
            {"step": int(r["step"]), "metric": float(r[metric]), "checkpoint_path": r["checkpoint_path"]}
            for r in df.to_dict("records") if isinstance(r.get("checkpoint_path"), str) and r["checkpoint_path"]
            and r.get(metric) is not None and not math.isnan(r[metric])]
        params = {n: result.config.get(n) for n in sweep.space}
        last = result.metrics or {}
        if result.error is not None:
            status = f"error: {type(result.error).__name__}"
        elif "train_loss" in last:
            status = "completed"
        else:
            status = "stopped early"
        trial_id = last.get("trial_id") or (os.path.basename(result.path) if result.path else "?")
        row = {"trial_id": trial_id, "params": params, "status": status, "history": history, "reports": len(history)}
        if history:
            best = max(history, key=lambda h: h["metric"])
            row.update(best_metric=best["metric"], best_step=best["step"], best_checkpoint=best["checkpoint_path"],
                       last_step=history[-1]["step"], zero_shot=last.get(f"zero_shot_{metric[len('eval_'):]}"))
        else:
            row.update(best_metric=None, best_step=None, best_checkpoint=None, last_step=None, zero_shot=None)
        rows.append(row)
    rows.sort(key=lambda r: (r["best_metric"] is None, -(r["best_metric"] or 0.0)))
    return rows


def export_best(best: dict[str, Any], output_dir: str) -> str:
    """The best trial's best checkpoint's model, published to ``output_dir``."""
    if not best.get("best_checkpoint"):
        raise RuntimeError(f"trial {best['trial_id']} reported no checkpoint for its best validation")
    with Checkpoint(best["best_checkpoint"]).as_directory() as ckpt_dir:
        src = os.path.join(ckpt_dir, MODEL_SUBDIR)
        if not os.path.isdir(src):
            raise RuntimeError(f"the checkpoint {best['best_checkpoint']} holds no exported model")
        return publish_model(src, output_dir)


def write_best_config(sweep: SweepConfig, best: dict[str, Any], base_cfg: FinetuneConfig, results_dir: str) -> str:
    """A `bge-ray train` config: the sweep's training values with the best trial's values filled in."""
    values = {k: v for k, v in sweep.train.items() if k not in ("run_name",)}
    values.update(best["params"])
    values["output_dir"] = base_cfg.output_dir
    build_config(values, where="best config")  # what we write must load
    path = os.path.join(results_dir, "best_config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# bge-ray tune: best trial {best['trial_id']}, {sweep.metric} {best['best_metric']:.4f} "
                f"at step {best['best_step']}\n# train it again with: bge-ray train --config {path}\n")
        yaml.safe_dump(values, f, sort_keys=True)
    return path


def value_text(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _table_rows(trials: list[dict[str, Any]], sweep: SweepConfig) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "trial", *sweep.space, f"best {sweep.metric}", "best step", "last step", "status"]
    body = []
    for i, t in enumerate(trials, 1):
        body.append([str(i), t["trial_id"], *(value_text(t["params"][n]) for n in sweep.space),
                     "" if t["best_metric"] is None else f"{t['best_metric']:.4f}",
                     "" if t["best_step"] is None else str(t["best_step"]),
                     "" if t["last_step"] is None else str(t["last_step"]), t["status"]])
    return head, body


def format_trials(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str) -> str:
    head, body = _table_rows(trials, sweep)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_tables(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str, results_dir: str) -> None:
    head, body = _table_rows(trials, sweep)
    with open(os.path.join(results_dir, "trials.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", *sweep.space, f"best_{metric}", "best_step", "last_step", "status"])
        for i, t in enumerate(trials, 1):
            w.writerow([i, t["trial_id"], *(t["params"][n] for n in sweep.space),
                        "" if t["best_metric"] is None else t["best_metric"], t["best_step"], t["last_step"],
                        t["status"]])
    with open(os.path.join(results_dir, "trials.md"), "w", encoding="utf-8") as f:
        f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        f.writelines("| " + " | ".join(r) + " |\n" for r in body)


def plot(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str, path: str) -> None:
    """One PNG: the best metric against each swept value (one panel per field), and the metric
    against training steps for every trial."""
    import matplotlib  # only here: the rest of bge-ray does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sweep.space)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.6), squeeze=False)
    scored = [t for t in trials if t["best_metric"] is not None]
    colors = {"completed": "tab:blue", "stopped early": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=False):
        dist = sweep.space[name]
        xs = [t["params"][name] for t in scored]
        if dist.kind in ("choice", "grid") and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            cats = [str(v) for v in dist.args]
            ax.set_xticks(range(len(cats)), cats)
            xs = [cats.index(str(x)) for x in xs]
        elif dist.log_scale or (dist.kind in ("choice", "grid") and min(xs or [1]) > 0
                                and max(xs or [1]) / max(min(xs or [1]), 1e-30) > 50):
            ax.set_xscale("log")
        ax.scatter(xs, [t["best_metric"] for t in scored], c=[colors.get(t["status"], "tab:red") for t in scored])
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for t in trials:
        if t["history"]:
            ax.plot([h["step"] for h in t["history"]], [h["metric"] for h in t["history"]], marker="o",
                    linestyle="--" if t["status"] == "stopped early" else "-", label=t["trial_id"])
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title("dashed: stopped early", fontsize=9)
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
