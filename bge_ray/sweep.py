"""Hyperparameter sweeps on Ray Tune: ``bge-ray tune --config sweep.yaml`` / ``bge_ray.tune(...)``.

A sweep file is a training config (any ``bge-ray train`` key, inline or from ``base_config``) plus

    search_space:                      # any training field; default: temperature, learning_rate, pooling
      temperature: {loguniform: [0.01, 0.1]}
      learning_rate: {choice: [1.0e-5, 2.0e-5, 5.0e-5]}
      sentence_pooling_method: {grid: [cls, mean]}
    tune:                              # how to search (see TuneSettings)
      num_samples: 8
      scheduler: asha

Each trial is a full fine-tune (a ``TorchTrainer`` with its own DeepSpeed workers) launched from a
Tune function, the Ray 2.60 (Train V2) pattern; ``TuneReportCallback`` forwards every validation
report (``eval_<metric>`` at each ``eval_steps``) to Tune, where ASHA stops weak trials early.
The sweep's experiment and every trial's checkpoints live under ``storage_path``, so running the
same command again continues an interrupted sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from bge_ray.config import (
    ConfigError,
    FinetuneConfig,
    _base_type,
    _hints,
    _unknown_key_error,
    build_config,
    coerce,
    knob,
    load_yaml,
    parse_overrides,
    validate,
)

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_SPACE = {
    "temperature": {"loguniform": [0.01, 0.1]},
    "learning_rate": {"loguniform": [1e-5, 1e-4]},
    "sentence_pooling_method": {"choice": ["cls", "mean"]},
}
# Fields a trial cannot vary: where things go, how the cluster is used, how trials are compared.
NOT_SWEEPABLE = {"output_dir", "run_name", "storage_path", "ray_address", "resume", "num_workers", "use_gpu",
                 "resources_per_worker", "eval_data", "eval_split", "metric_for_best_model", "final_model",
                 "max_failures"}


@dataclass
class TuneSettings:
    """How the sweep searches (the ``tune:`` section; each key also works as ``--key value``)."""

    COMMAND: ClassVar[str] = "tune"

    num_samples: int = knob(8, "sampled trial configs (each repeated for every point of the grid axes)")
    search_alg: str = knob("random", "random (seeded; grid axes crossed with the samples) or optuna (TPE)")
    scheduler: str = knob("asha", "asha (stop weak trials at each validation) or none")
    grace_period: int = knob(1, "validations a trial always gets before ASHA may stop it")
    reduction_factor: int = knob(2, "ASHA keeps the top 1/reduction_factor of trials at each rung")
    max_concurrent_trials: int | None = knob(None, "trials at once", shown="as many as the cluster fits")
    sweep_seed: int = knob(42, "seeds the sampling of trial configs")
    results_dir: str | None = knob(None, "where the trial tables, best_config.yaml and sweep.png go",
                                   shown="<output_dir>_sweep")

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.search_alg not in ("random", "optuna"):
            raise ConfigError(f"search_alg must be random or optuna, got {self.search_alg!r}")
        if self.scheduler not in ("asha", "none"):
            raise ConfigError(f"scheduler must be asha or none, got {self.scheduler!r}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("grace_period must be >= 1 and reduction_factor >= 2")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials must be >= 1 or unset, got {self.max_concurrent_trials}")


@dataclass
class Dist:
    """One swept field: a distribution and its arguments, checked against the field's type."""

    name: str
    kind: str
    args: list[Any]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.args)
        if self.kind == "grid":
            return tune.grid_search(self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(*self.args)

    def extremes(self) -> list[Any]:
        """Values every trial config must accept: each choice, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def describe(self) -> str:
        return f"{self.kind}{self.args}"


def parse_space(raw: Any) -> dict[str, Dist]:
    """``{field: {distribution: args}}`` -> checked :class:`Dist` objects."""
    if raw is None:
        raw = DEFAULT_SPACE
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search_space must map training fields to distributions, e.g. "
                          "{temperature: {loguniform: [0.01, 0.1]}}")
    hints = _hints(FinetuneConfig)
    space: dict[str, Dist] = {}
    for name, spec in raw.items():
        where = f"search_space.{name}"
        if name not in hints:
            raise _unknown_key_error(str(name), "search_space")
        if name in NOT_SWEEPABLE:
            raise ConfigError(f"{where}: {name} cannot be swept (it is the same for every trial)")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: give one distribution as a mapping, e.g. {{choice: [a, b]}}; "
                              f"distributions: {', '.join(DISTRIBUTIONS)}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
        base = _base_type(hints[name])
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values")
            values = [coerce(name, v) for v in args]
            space[name] = Dist(name, kind, values)
            continue
        if not isinstance(args, list) or len(args) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if kind in ("uniform", "loguniform"):
            if base is not float:
                hint = " (use randint for an integer field)" if base is int else " (use choice or grid)"
                raise ConfigError(f"{where}: {kind} needs a float field; {name} is {getattr(base, '__name__', base)}{hint}")
            if not low < high:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
            space[name] = Dist(name, kind, [float(low), float(high)])
        else:
            if base is not int:
                raise ConfigError(f"{where}: randint needs an integer field; {name} is {getattr(base, '__name__', base)}")
            if int(low) != low or int(high) != high or not low < high:
                raise ConfigError(f"{where}: randint needs integers low < high (high excluded), got {args}")
            space[name] = Dist(name, kind, [int(low), int(high)])
    return space


@dataclass
class SweepConfig:
    """A sweep: the training values every trial starts from, the search space, the search settings."""

    train: dict[str, Any]
    space: dict[str, Dist]
    settings: TuneSettings = field(default_factory=TuneSettings)

    def base_config(self) -> FinetuneConfig:
        """The training config with each swept field at its first value (validated)."""
        values = dict(self.train)
        for name, dist in self.space.items():
            values[name] = dist.extremes()[0]
        cfg = build_config(values, where="sweep")
        validate(cfg)
        return cfg

    def validate(self) -> None:
        self.settings.validate()
        if not self.train.get("eval_data") or str(self.train["eval_data"]).lower() in ("none", "null"):
            raise ConfigError("a sweep picks its best trial by a validation metric: set eval_data "
                              "(a BEIR or FlagEmbedding evaluation folder)")
        for name, dist in self.space.items():  # each value on its own, so an error names its field
            for value in dist.extremes():
                try:
                    validate(build_config({**self.train, name: value}, where="sweep"))
                except ConfigError as e:
                    raise ConfigError(f"search_space.{name} = {value!r} gives a config that cannot run: {e}") from None
        self.base_config()
        if self.settings.search_alg == "optuna":
            if any(d.kind == "grid" for d in self.space.values()):
                raise ConfigError("grid axes need search_alg: random (Optuna samples; use choice instead)")
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError("search_alg: optuna needs the optuna package: pip install optuna") from None

    @property
    def metric(self) -> str:
        return f"eval_{self.train.get('metric_for_best_model') or FinetuneConfig.metric_for_best_model}"


_SETTINGS = {f.name for f in dataclasses.fields(TuneSettings)}


def _group_argv(argv: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for tok in argv:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def load_sweep(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> SweepConfig:
    """A sweep YAML (optional) + ``--key value`` overrides (training keys, tune settings, or
    ``--search_space`` as JSON/YAML) -> a validated :class:`SweepConfig`. Touches no cluster."""
    raw = _read_sweep_yaml(path) if path else {}
    space_raw = raw.pop("search_space", None)
    settings_raw = raw.pop("tune", None) or {}
    if not isinstance(settings_raw, dict):
        raise ConfigError(f"{path}: 'tune' must be a mapping of search settings")
    train = raw
    if isinstance(overrides, dict):
        overrides = [tok for k, v in overrides.items() for tok in ([f"--{k}", json_str(v)])]
    for group in _group_argv(list(overrides or [])):
        key = group[0][2:].partition("=")[0].replace("-", "_") if group[0].startswith("--") else ""
        if key == "search_space":
            text = group[0].partition("=")[2] or " ".join(group[1:])
            try:
                space_raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"--search_space must be JSON or YAML: {e}") from None
        elif key in _SETTINGS:
            settings_raw.update(parse_overrides(group, TuneSettings))
        else:
            train.update(parse_overrides(group, FinetuneConfig))
    settings = build_config(settings_raw, where="tune", cls=TuneSettings)
    sweep = SweepConfig(train=train, space=parse_space(space_raw), settings=settings)
    sweep.validate()
    return sweep


def json_str(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _read_sweep_yaml(path: str) -> dict[str, Any]:
    raw = load_yaml(path)
    base = raw.pop("base_config", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base_config must be the path of a training config")
    if not os.path.isabs(base):
        base = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    merged = load_yaml(base)
    merged.update(raw)
    return merged


# ------------------------------------------------------------------------------------------------ run

@dataclass
class TuneResult:
    """What a sweep produced."""

    model_dir: str
    results_dir: str
    best_config_path: str
    best_params: dict[str, Any]
    best_metric: float
    metric: str
    trials: list[dict[str, Any]]
    num_stopped_early: int
    wall_s: float
    experiment_path: str


def _log(msg: str) -> None:
    print(f"[bge-ray] {msg}", file=sys.stderr, flush=True)


def _run_trial(params: dict[str, Any], base: dict[str, Any], runs_dir: str) -> None:
    """The Tune function: one full distributed fine-tune with this trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from bge_ray.api import finetune

    trial_id = tune.get_context().get_trial_id()
    values = {**base, **params, "storage_path": runs_dir, "run_name": trial_id, "resume": "auto",
              "output_dir": os.path.join(runs_dir, trial_id, "model")}
    finetune(values, callbacks=[TuneReportCallback()], publish=False)


TRIAL_FN_CPUS = 0.01  # the Tune function only launches the trainer; Tune needs a non-zero request


def _trial_cpus(cfg: FinetuneConfig) -> float:
    """CPUs one trial holds: its training workers, one for its Ray Data tasks, the trial function."""
    return cfg.num_workers * cfg.worker_resources.get("CPU", 1) + 1 + TRIAL_FN_CPUS


def trial_concurrency(cfg: FinetuneConfig, requested: int | None) -> int:
    """How many trials fit the cluster at once: each needs its workers plus one CPU for its data tasks."""
    import ray

    res = ray.cluster_resources()
    per = cfg.worker_resources
    need_cpu = _trial_cpus(cfg)
    fits = int(res.get("CPU", 0) // need_cpu)
    if per.get("GPU", 0) > 0:
        fits = min(fits, int(res.get("GPU", 0) // (cfg.num_workers * per["GPU"])))
    if fits < 1:
        _log(f"the cluster has {res.get('CPU', 0):.0f} CPUs / {res.get('GPU', 0):.0f} GPUs, less than one trial needs "
             f"({need_cpu:.0f} CPUs, {cfg.num_workers * per.get('GPU', 0):.0f} GPUs); running one trial at a time "
             "(an autoscaling cluster adds nodes for it)")
        fits = 1
    if requested is not None and requested > fits:
        _log(f"max_concurrent_trials {requested} does not fit the cluster; using {fits}")
    return min(fits, requested) if requested is not None else fits


def _resolve_sweep_name(cfg: FinetuneConfig, storage: str) -> tuple[str, bool]:
    from ray import tune

    name = cfg.run_name or f"bge-ray-sweep-{os.path.basename(os.path.abspath(cfg.output_dir))}"
    path = f"{storage.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path):
        return name, False
    if cfg.resume == "never":
        fresh = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _log(f"resume: never; {path} exists, starting a new sweep {fresh}")
        return fresh, False
    _log(f"continuing the sweep in {path} (resume: never starts a new one)")
    return name, True


def tune(config: SweepConfig | dict[str, Any] | str | None = None, overrides: list[str] | dict[str, Any] | None = None,
         ) -> TuneResult:
    """Run a hyperparameter sweep; write the best model to ``output_dir`` and the results to ``results_dir``.

    ``config``: a :class:`SweepConfig`, a sweep YAML path, or a dict shaped like the YAML
    (training keys + ``search_space`` + ``tune``). Validated before Ray starts.
    """
    if isinstance(config, SweepConfig):
        sweep = config
        sweep.validate()
    elif isinstance(config, dict):
        raw = dict(config)
        space_raw, settings_raw = raw.pop("search_space", None), raw.pop("tune", None) or {}
        sweep = SweepConfig(train=raw, space=parse_space(space_raw),
                            settings=build_config(settings_raw, where="tune", cls=TuneSettings))
        if overrides:
            raise ConfigError("pass overrides with a YAML path, or put them in the dict")
        sweep.validate()
    else:
        sweep = load_sweep(config, overrides)
    t0 = time.time()
    from ray import tune as rtune

    from bge_ray.api import _publish_model, connect_ray

    base_cfg = sweep.base_config()
    per_trial = _trial_cpus(base_cfg)
    # a local cluster holds at least one trial: its workers, its data tasks, the trial function
    connect_ray(base_cfg.ray_address, max(os.cpu_count() or 1, math.ceil(per_trial)))
    storage = base_cfg.storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    name, restoring = _resolve_sweep_name(base_cfg, storage)
    runs_dir = f"{storage.rstrip('/')}/{name}/train_runs"
    settings, metric = sweep.settings, sweep.metric
    concurrency = trial_concurrency(base_cfg, settings.max_concurrent_trials)
    train_values = {k: v for k, v in sweep.train.items() if k not in ("run_name", "storage_path", "output_dir")}
    trainable = rtune.with_parameters(_run_trial, base=train_values, runs_dir=runs_dir)
    # the trial function only launches the trainer; its workers hold the real resources
    trainable = rtune.with_resources(trainable, {"CPU": TRIAL_FN_CPUS})
    space = {n: d.tune_domain() for n, d in sweep.space.items()}
    _log(f"sweep {name}: {settings.num_samples} sample(s) of {', '.join(f'{n} {d.describe()}' for n, d in sweep.space.items())}"
         f"; {settings.search_alg} search, scheduler {settings.scheduler}, {concurrency} trial(s) at a time, "
         f"best by {metric}")
    if restoring:
        tuner = rtune.Tuner.restore(f"{storage.rstrip('/')}/{name}", trainable=trainable, resume_unfinished=True,
                                    resume_errored=True, param_space=space)
    else:
        tuner = rtune.Tuner(trainable, param_space=space, tune_config=_tune_config(sweep, concurrency),
                            run_config=rtune.RunConfig(name=name, storage_path=storage, verbose=1))
    grid = tuner.fit()
    trials = _collect_trials(grid, sweep, metric)
    scored = [t for t in trials if t.get("best_metric") is not None]
    if not scored:
        errors = "; ".join(f"{t['trial_id']}: {t['status']}" for t in trials)
        raise RuntimeError(f"no trial reported {metric}; trials: {errors}")
    best = scored[0]
    results_dir = settings.results_dir or f"{os.path.abspath(base_cfg.output_dir)}_sweep"
    os.makedirs(results_dir, exist_ok=True)
    model_dir = _export_best(best, base_cfg.output_dir, _publish_model)
    best_config_path = _write_best_config(sweep, best, base_cfg, results_dir)
    _write_tables(trials, sweep, metric, results_dir)
    _plot(trials, sweep, metric, os.path.join(results_dir, "sweep.png"))
    stopped = sum(1 for t in trials if t["status"] == "stopped early")
    wall = time.time() - t0
    print(format_trials(trials, sweep, metric))
    _log(f"best trial {best['trial_id']}: {metric} {best['best_metric']:.4f} at step {best['best_step']} "
         f"({', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}); {stopped} trial(s) stopped early; "
         f"model {model_dir}; results {results_dir}")
    return TuneResult(model_dir=model_dir, results_dir=results_dir, best_config_path=best_config_path,
                      best_params=best["params"], best_metric=best["best_metric"], metric=metric, trials=trials,
                      num_stopped_early=stopped, wall_s=wall, experiment_path=grid.experiment_path)


def _tune_config(sweep: SweepConfig, concurrency: int) -> Any:
    from ray import tune as rtune

    s = sweep.settings
    if s.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=s.sweep_seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        # a SearchGenerator: Tune ignores max_concurrent_trials for it, so the limit goes here
        search = BasicVariantGenerator(random_state=s.sweep_seed, max_concurrent=concurrency)
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time is counted in validations (one report per eval_steps); max_t only bounds the rungs
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    return rtune.TuneConfig(metric=sweep.metric, mode="max", search_alg=search, scheduler=scheduler,
                            num_samples=s.num_samples, max_concurrent_trials=concurrency)


def _collect_trials(grid: Any, sweep: SweepConfig, metric: str) -> list[dict[str, Any]]:
    """One row per trial: its values, best and last validation, whether it finished, was stopped or failed."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        history = [] if df is None or metric not in df.columns else [
            {"step": int(r["step"]), "metric": float(r[metric]), "checkpoint_path": r.get("checkpoint_path")}
            for r in df.to_dict("records") if r.get(metric) is not None and not math.isnan(r[metric])]
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


def _export_best(best: dict[str, Any], output_dir: str, publish: Any) -> str:
    from ray.train import Checkpoint

    from bge_ray.train import MODEL_SUBDIR

    if not best.get("best_checkpoint"):
        raise RuntimeError(f"trial {best['trial_id']} reported no checkpoint for its best validation")
    with Checkpoint(best["best_checkpoint"]).as_directory() as ckpt_dir:
        src = os.path.join(ckpt_dir, MODEL_SUBDIR)
        if not os.path.isdir(src):
            raise RuntimeError(f"the checkpoint {best['best_checkpoint']} holds no exported model")
        return publish(src, output_dir)


def _write_best_config(sweep: SweepConfig, best: dict[str, Any], base_cfg: FinetuneConfig, results_dir: str) -> str:
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


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _table_rows(trials: list[dict[str, Any]], sweep: SweepConfig) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "trial", *sweep.space, f"best {sweep.metric}", "best step", "last step", "status"]
    body = []
    for i, t in enumerate(trials, 1):
        body.append([str(i), t["trial_id"], *(_fmt(t["params"][n]) for n in sweep.space),
                     "" if t["best_metric"] is None else f"{t['best_metric']:.4f}",
                     "" if t["best_step"] is None else str(t["best_step"]),
                     "" if t["last_step"] is None else str(t["last_step"]), t["status"]])
    return head, body


def format_trials(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str) -> str:
    head, body = _table_rows(trials, sweep)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _write_tables(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str, results_dir: str) -> None:
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


def _plot(trials: list[dict[str, Any]], sweep: SweepConfig, metric: str, path: str) -> None:
    """One PNG: the best metric against each swept value (one panel per field), and the metric
    against training steps for every trial."""
    import matplotlib

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
