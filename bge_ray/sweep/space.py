"""The sweep's definition: a training config, a search space and the search settings (``TuneSettings``).

Hyperparameter sweeps on Ray Tune: ``bge-ray tune --config sweep.yaml`` / ``bge_ray.tune(...)``.

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

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from bge_ray.config.fields import base_type, coerce, field_hints, knob, unknown_key_error
from bge_ray.config.finetune import FinetuneConfig
from bge_ray.config.parse import build_config, load_yaml, parse_overrides
from bge_ray.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_SPACE = {
    "temperature": {"loguniform": [0.01, 0.1]},
    "learning_rate": {"loguniform": [1e-5, 1e-4]},
    "sentence_pooling_method": {"choice": ["cls", "mean"]},
}
# Fields a trial cannot vary: where things go, how the cluster is used, how trials are compared.
NOT_SWEEPABLE = {"output_dir", "run_name", "storage_path", "ray_address", "resume", "num_workers", "use_gpu",
                 "resources_per_worker", "accelerator_type", "eval_data", "eval_split", "metric_for_best_model", "final_model",
                 "max_failures", "placement_strategy", "overwrite_output_dir", "cache_path"}


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
    hints = field_hints(FinetuneConfig)
    space: dict[str, Dist] = {}
    for name, spec in raw.items():
        where = f"search_space.{name}"
        if name not in hints:
            raise unknown_key_error(str(name), "search_space", FinetuneConfig)
        if name in NOT_SWEEPABLE:
            raise ConfigError(f"{where}: {name} cannot be swept (it is the same for every trial)")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: give one distribution as a mapping, e.g. {{choice: [a, b]}}; "
                              f"distributions: {', '.join(DISTRIBUTIONS)}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
        base = base_type(hints[name])
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values")
            values = [coerce(name, v, FinetuneConfig) for v in args]
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
        cfg = build_config(values, where="sweep").resolved()
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.settings.validate()
        if not self.train.get("eval_data") or str(self.train["eval_data"]).lower() in ("none", "null"):
            raise ConfigError("a sweep picks its best trial by a validation metric: set eval_data "
                              "(a BEIR or FlagEmbedding evaluation folder)")
        firsts = {name: dist.extremes()[0] for name, dist in self.space.items()}
        for name, dist in self.space.items():  # each value, the other axes at their first, so an error names its field
            for value in dist.extremes():
                try:
                    build_config({**self.train, **firsts, name: value}, where="sweep").resolved().validate()
                except ConfigError as e:
                    raise ConfigError(f"search_space.{name} = {value!r} gives a config that cannot run: {e}") from None
        self.base_config()
        if self.settings.search_alg == "optuna":
            if any(d.kind == "grid" for d in self.space.values()):
                raise ConfigError("grid axes need search_alg: random (Optuna samples; use choice instead)")
            try:
                import optuna  # noqa: F401  (an optional extra)
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
