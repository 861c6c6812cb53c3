"""Running a sweep: one Tune trial per sampled config, each a full distributed fine-tune launched from
a Tune function (Ray 2.60's Train V2 pattern); ASHA stops weak trials at their validations.

The sweep's experiment and every trial's checkpoints live under ``storage_path``, so running the
same command again continues an interrupted sweep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ray import tune as rtune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from bge_ray.cluster import capacity, connect_ray, need_for_training, shortfall
from bge_ray.config.finetune import FinetuneConfig, check_output_dir, check_survives_job
from bge_ray.config.parse import build_config
from bge_ray.console import log
from bge_ray.errors import ConfigError
from bge_ray.storage import storage_root
from bge_ray.sweep.report import (
    collect_trials,
    export_best,
    format_trials,
    plot,
    value_text,
    write_best_config,
    write_tables,
)
from bge_ray.sweep.space import Dist, SweepConfig, TuneSettings, load_sweep, parse_space
from bge_ray.train.launch import choose_devices, finetune

TRIAL_FN_CPUS = 0.01  # the Tune function only launches the trainer; Tune needs a non-zero request


@dataclass
class TuneResult:
    """What a sweep produced."""

    model_dir: str                  # the best trial's best model, in output_dir
    results_dir: str                # trials.csv / trials.md, best_config.yaml, sweep.png
    best_config_path: str
    best_params: dict[str, Any]
    best_metric: float
    metric: str
    trials: list[dict[str, Any]]
    num_stopped_early: int
    wall_s: float
    experiment_path: str


class SweepReportCallback(TuneReportCallback):
    """Every report of a trial to Tune, flat: the latest log record's fields, the latest validation's
    metric (Tune wants the metric in every result) and ``validations``, the count of validations
    after step 0, which is ASHA's clock; a validation's report also carries its checkpoint's path."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric, self.validations, self.last_eval = metric, 0, None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = {k: v for k, v in metrics[0].items() if k != "records"}
        if self.metric in report:
            self.last_eval = report[self.metric]
            self.validations += int(report.get("step", 0) > 0)
        if self.last_eval is None:
            return  # nothing to rank a trial by before its zero-shot validation
        report.update({self.metric: self.last_eval, "validations": self.validations})
        super().after_report(run_context, [report], checkpoint)


def tune_domain(dist: Dist) -> Any:
    """The Tune search-space object of a swept field."""
    if dist.kind == "choice":
        return rtune.choice(dist.args)
    if dist.kind == "grid":
        return rtune.grid_search(dist.args)
    if dist.kind == "uniform":
        return rtune.uniform(*dist.args)
    if dist.kind == "loguniform":
        return rtune.loguniform(*dist.args)
    return rtune.randint(*dist.args)


def _run_trial(params: dict[str, Any], base: dict[str, Any], runs_dir: str, metric: str) -> None:
    """The Tune function: one full distributed fine-tune with this trial's values."""
    trial_id = rtune.get_context().get_trial_id()
    values = {**base, **params, "storage_path": runs_dir, "run_name": trial_id, "resume": "auto",
              "output_dir": os.path.join(runs_dir, trial_id, "model")}
    finetune(values, callbacks=[SweepReportCallback(metric)], publish=False)


def trial_need(cfg: FinetuneConfig) -> dict[str, float]:
    """What one trial holds: its training workers, the trial function and a whole CPU for its Ray Data
    tasks (the function's fraction cannot host them)."""
    return need_for_training(cfg.num_workers, cfg.worker_resources, TRIAL_FN_CPUS)


def trial_concurrency(cfg: FinetuneConfig, requested: int | None) -> int:
    """How many trials run at once: as many as the cluster can grow to (an autoscaler's maximum, not
    the nodes up at launch), capped by ``requested``.

    Raises:
        ConfigError: not even one trial fits what the cluster can ever hold (a sweep would wait forever).
    """
    cap, need = capacity(), trial_need(cfg)
    limit = cap.limit
    fits = min(int(limit.get(kind, 0) // amount) for kind, amount in need.items() if amount)
    if fits < 1:
        grows = "its autoscaler can add no more" if cap.most is not None else "it has no autoscaler to add nodes"
        raise ConfigError(f"one trial needs {', '.join(shortfall(need, limit))}: {cfg.num_workers} workers x "
                          f"{cfg.worker_resources}, the trial function's {TRIAL_FN_CPUS} CPU and 1 whole CPU for its "
                          f"data tasks; {grows}. Lower num_workers / resources_per_worker, or use a bigger cluster")
    if shortfall(need, cap.now):
        log(f"the cluster holds less than one trial now; its autoscaler can grow it to {fits} trial(s) at a time")
    if requested is not None and requested > fits:
        log(f"max_concurrent_trials {requested} does not fit the cluster; using {fits}")
    return min(fits, requested) if requested is not None else fits


def resolve_sweep_name(cfg: FinetuneConfig, storage: str) -> tuple[str, bool]:
    """The sweep's name under ``storage``, and whether an interrupted sweep of that name is continued."""
    name = cfg.run_name or f"bge-ray-sweep-{os.path.basename(os.path.abspath(cfg.output_dir))}"
    path = f"{storage.rstrip('/')}/{name}"
    if not rtune.Tuner.can_restore(path):
        return name, False
    if cfg.resume == "never":
        fresh = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        log(f"resume: never; {path} exists, starting a new sweep {fresh}")
        return fresh, False
    log(f"continuing the sweep in {path} (resume: never starts a new one)")
    return name, True


def tune_config(sweep: SweepConfig, concurrency: int) -> rtune.TuneConfig:
    """Tune's search (seeded random or Optuna's TPE) and scheduler (ASHA, counting validations)."""
    s = sweep.settings
    if s.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optuna is an optional extra

        search = OptunaSearch(seed=s.sweep_seed)
    else:
        # a SearchGenerator: Tune ignores max_concurrent_trials for it, so the limit goes here
        search = BasicVariantGenerator(random_state=s.sweep_seed, max_concurrent=concurrency)
    scheduler = None
    if s.scheduler == "asha":
        # time is counted in validations (SweepReportCallback); max_t only bounds the rungs
        scheduler = ASHAScheduler(time_attr="validations", max_t=10_000, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    return rtune.TuneConfig(metric=sweep.metric, mode="max", search_alg=search, scheduler=scheduler,
                            num_samples=s.num_samples, max_concurrent_trials=concurrency)


def _as_sweep(config: SweepConfig | dict[str, Any] | str | None, overrides: list[str] | dict[str, Any] | None,
              ) -> SweepConfig:
    if isinstance(config, SweepConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        if overrides:
            raise ConfigError("pass overrides with a YAML path, or put them in the dict")
        raw = dict(config)
        space_raw, settings_raw = raw.pop("search_space", None), raw.pop("tune", None) or {}
        sweep = SweepConfig(train=raw, space=parse_space(space_raw),
                            settings=build_config(settings_raw, where="tune", cls=TuneSettings))
        sweep.validate()
        return sweep
    return load_sweep(config, overrides)


def _tuner(sweep: SweepConfig, base_cfg: FinetuneConfig, storage: str) -> tuple[rtune.Tuner, str]:
    name, restoring = resolve_sweep_name(base_cfg, storage)
    runs_dir = f"{storage.rstrip('/')}/{name}/train_runs"
    settings, metric = sweep.settings, sweep.metric
    concurrency = trial_concurrency(base_cfg, settings.max_concurrent_trials)
    train_values = {k: v for k, v in sweep.train.items() if k not in ("run_name", "storage_path", "output_dir")}
    train_values["use_gpu"] = base_cfg.use_gpu  # auto decided once, for every trial alike
    trainable = rtune.with_parameters(_run_trial, base=train_values, runs_dir=runs_dir, metric=metric)
    # the trial function only launches the trainer; its workers hold the real resources
    trainable = rtune.with_resources(trainable, {"CPU": TRIAL_FN_CPUS})
    space = {n: tune_domain(d) for n, d in sweep.space.items()}
    log(f"sweep {name}: {settings.num_samples} sample(s) of {', '.join(f'{n} {d.describe()}' for n, d in sweep.space.items())}"
        f"; {settings.search_alg} search, scheduler {settings.scheduler}, {concurrency} trial(s) at a time, "
        f"best by {metric}")
    if restoring:
        return rtune.Tuner.restore(f"{storage.rstrip('/')}/{name}", trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=space), name
    return rtune.Tuner(trainable, param_space=space, tune_config=tune_config(sweep, concurrency),
                       run_config=rtune.RunConfig(name=name, storage_path=storage, verbose=1)), name


def tune(config: SweepConfig | dict[str, Any] | str | None = None,
         overrides: list[str] | dict[str, Any] | None = None) -> TuneResult:
    """Run a hyperparameter sweep; write the best model to ``output_dir`` and the results to ``results_dir``.

    Args:
        config: a :class:`SweepConfig`, a sweep YAML path, or a dict shaped like the YAML (training
            keys + ``search_space`` + ``tune``). Validated before Ray starts.
        overrides: ``--key value`` arguments (training keys, tune settings, ``--search_space``) with
            a YAML path.

    Returns:
        A :class:`TuneResult`: the best model, its values and metric, every trial's row.

    Raises:
        ConfigError: a bad sweep (unknown field, a distribution that does not fit its field, a value
            the training config rejects, no eval_data...).
        RuntimeError: no trial reported the metric.
    """
    sweep = _as_sweep(config, overrides)
    t0 = time.time()
    base_cfg = sweep.base_config()
    check_survives_job(base_cfg.output_dir, "output_dir")
    check_output_dir(base_cfg)  # the best model goes there: not over one already there, unasked
    # a local cluster holds at least one trial: its workers, its data tasks, the trial function
    connect_ray(base_cfg.ray_address, max(os.cpu_count() or 1, int(trial_need(base_cfg)["CPU"])))
    base_cfg = choose_devices(base_cfg)
    tuner, _ = _tuner(sweep, base_cfg, storage_root(base_cfg.storage_path))
    grid = tuner.fit()
    metric = sweep.metric
    trials = collect_trials(grid, sweep, metric)
    scored = [t for t in trials if t.get("best_metric") is not None]
    if not scored:
        errors = "; ".join(f"{t['trial_id']}: {t['status']}" for t in trials)
        raise RuntimeError(f"no trial reported {metric}; trials: {errors}")
    best = scored[0]
    results_dir = sweep.settings.results_dir or f"{os.path.abspath(base_cfg.output_dir)}_sweep"
    os.makedirs(results_dir, exist_ok=True)
    model_dir = export_best(best, base_cfg.output_dir)
    best_config_path = write_best_config(sweep, best, base_cfg, results_dir)
    write_tables(trials, sweep, metric, results_dir)
    plot(trials, sweep, metric, os.path.join(results_dir, "sweep.png"))
    stopped = sum(1 for t in trials if t["status"] == "stopped early")
    print(format_trials(trials, sweep, metric))
    log(f"best trial {best['trial_id']}: {metric} {best['best_metric']:.4f} at step {best['best_step']} "
        f"({', '.join(f'{k}={value_text(v)}' for k, v in best['params'].items())}); {stopped} trial(s) stopped early; "
        f"model {model_dir}; results {results_dir}")
    return TuneResult(model_dir=model_dir, results_dir=results_dir, best_config_path=best_config_path,
                      best_params=best["params"], best_metric=best["best_metric"], metric=metric, trials=trials,
                      num_stopped_early=stopped, wall_s=time.time() - t0, experiment_path=grid.experiment_path)
