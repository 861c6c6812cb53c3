"""Experiment trackers (``report_to``, HF's names): TensorBoard, Weights & Biases, MLflow.

The driver writes to them, once per run, what the workers report: every log record under
``train/`` (loss, learning rate, grad norm, throughput, data wait, epoch) and every validation
under ``eval/``, against the optimizer step; the run's config (credentials removed) as its
hyperparameters. A sweep's trials are runs of their own, named by trial, with the trial's values.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tensorboardX import SummaryWriter

from bge_ray.storage import strip_credentials

TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "groups_per_s", "tokens_per_s", "data_wait_frac", "epoch")


def hyperparameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as flat hyperparameters: credentials out, lists and dicts as text."""
    clean = strip_credentials(cfg)
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in clean.items() if v is not None}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers a tracker gets from one log record or validation."""
    if record.get("kind") == "eval":
        return {f"eval/{k[len('eval_'):]}": float(v) for k, v in record.items()
                if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith("_s")}
    return {f"train/{k}": float(record[k]) for k in TRAIN_KEYS if isinstance(record.get(k), (int, float))}


class TensorBoard:
    """Event files in ``<run dir>/tensorboard`` (``tensorboard --logdir`` on the run's storage)."""

    def __init__(self, run_dir: str, run_name: str, params: dict[str, Any]) -> None:
        self.logdir = f"{run_dir.rstrip('/')}/tensorboard"
        if "://" not in run_dir:
            os.makedirs(self.logdir, exist_ok=True)
        self.writer = SummaryWriter(self.logdir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(safe_tag(key), value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run (``WANDB_PROJECT``, default ``bge-ray``; ``WANDB_MODE=offline`` works)."""

    def __init__(self, run_dir: str, run_name: str, params: dict[str, Any]) -> None:
        import wandb  # an optional extra: pip install "bge-ray[wandb]"

        local = run_dir if "://" not in run_dir else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bge-ray"), name=run_name, id=_run_id(run_name),
                              resume="allow", config=params, dir=local, reinit="finish_previous")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in ``MLFLOW_EXPERIMENT_NAME`` (default ``bge-ray``) at ``MLFLOW_TRACKING_URI``."""

    def __init__(self, run_dir: str, run_name: str, params: dict[str, Any]) -> None:
        import mlflow  # an optional extra: pip install "bge-ray[mlflow]"

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "bge-ray"))
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{run_name}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=run_name)
        if not found:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({safe_tag(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def safe_tag(key: str) -> str:
    """A metric name TensorBoard and MLflow keep as it is: ``eval/ndcg@10`` -> ``eval/ndcg_at_10``."""
    return key.replace("@", "_at_")


def _run_id(run_name: str) -> str:
    """A tracker run id from the run's name, so a resumed run continues the same tracker run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}


def installed(name: str) -> bool:
    module = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}[name]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def chosen(report_to: list[str]) -> list[str]:
    """The trackers ``report_to`` names: ``all`` is every installed one, ``none`` none."""
    if "none" in report_to:
        return []
    if "all" in report_to:
        return [name for name in TRACKERS if installed(name)]
    return [name for name in TRACKERS if name in report_to]


def open_trackers(report_to: list[str], run_dir: str, run_name: str, cfg: dict[str, Any]) -> list[Any]:
    params = hyperparameters(cfg)
    return [TRACKERS[name](run_dir, run_name, params) for name in chosen(report_to)]
