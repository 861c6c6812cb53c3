"""DeepSpeed configs: the shipped ZeRO 0-3 files or the user's JSON, with ``"auto"`` filled from our config."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from bge_ray.config.finetune import ZERO_SHORTHANDS, FinetuneConfig
from bge_ray.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "deepspeed_configs")
BUCKET_CAP = int(5e8)  # DeepSpeed's own default bucket size, in elements
# "auto" values that depend on the model's size, filled on each worker once the model is loaded
MODEL_SIZED_KEYS = tuple(f"zero_optimization.{k}" for k in (
    "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"))


def load_base_config(deepspeed: str | None) -> dict[str, Any]:
    """The JSON for a ZeRO shorthand (``zero2``) or a user file; ZeRO-0 when unset."""
    if deepspeed is None:
        name = "zero0"
    elif str(deepspeed).lower() in ZERO_SHORTHANDS:
        name = f"zero{ZERO_SHORTHANDS[str(deepspeed).lower()]}"
    else:
        with open(deepspeed, encoding="utf-8") as f:
            return json.load(f)
    with open(os.path.join(CONFIG_DIR, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _fill(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Fill an ``auto`` (or missing) value; an explicit value that disagrees is an error."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") and current != value:
        raise ConfigError(
            f"deepspeed config sets {where}{key}={current} but the bge-ray config gives {value}; "
            "set it to \"auto\" in the JSON or change the bge-ray field"
        )


def build_deepspeed_config(cfg: FinetuneConfig, world_size: int, total_steps: int = 1,
                           warmup_steps: int = 0) -> dict[str, Any]:
    """The DeepSpeed config dict for this run, every ``auto`` resolved except the bucket sizes that
    depend on the model (:data:`MODEL_SIZED_KEYS`): the workers fill those with
    :func:`fill_model_sizes` from the model they load, so the driver never loads it."""
    ds = copy.deepcopy(load_base_config(cfg.deepspeed))
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "")
    _fill(ds, "train_batch_size", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size, "")
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "")
    for name, enabled in (("fp16", cfg.fp16), ("bf16", cfg.bf16)):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
        elif bool(section["enabled"]) != enabled:
            raise ConfigError(f"deepspeed config has {name}.enabled={section['enabled']} but the bge-ray config has {name}: {enabled}")
    ds.setdefault("zero_optimization", {"stage": 0})
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", cfg.learning_rate), ("betas", [cfg.adam_beta1, cfg.adam_beta2]),
                           ("eps", cfg.adam_epsilon), ("weight_decay", cfg.weight_decay)):
            _fill(params, key, value, "optimizer.params.")
    if "scheduler" in ds:
        params = ds["scheduler"].setdefault("params", {})
        for key, value in (("total_num_steps", total_steps), ("warmup_num_steps", warmup_steps),
                           ("warmup_max_lr", cfg.learning_rate), ("warmup_min_lr", 0.0)):
            _fill(params, key, value, "scheduler.params.")
    ds.setdefault("steps_per_print", 10**9)
    leftover = [k for k in _find_auto(ds) if k not in MODEL_SIZED_KEYS]
    if leftover:
        raise ConfigError(f"deepspeed config: bge-ray cannot fill \"auto\" for {', '.join(leftover)}; give explicit values")
    return ds


def fill_model_sizes(ds: dict[str, Any], hidden_size: int | None, num_params: int) -> dict[str, Any]:
    """A copy of ``ds`` with the model-sized ``auto`` bucket sizes filled (see :data:`MODEL_SIZED_KEYS`)."""
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if int(zero.get("stage", 0)) < 3:
        # one bucket never larger than the whole model: DeepSpeed's 5e8-element default allocates
        # 2 GB fp32 buffers per bucket, sized for billion-parameter models, not for small encoders
        # rounded up to a multiple of 8: ZeRO 1/2 require allgather_bucket_size to be even (4-byte
        # aligned fp16 buffers), and a model with BGE-M3's heads can have an odd parameter count
        bucket = min(BUCKET_CAP, -(-num_params // 8) * 8) if num_params else BUCKET_CAP
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if zero.get(key) == "auto":
                zero[key] = bucket
    elif hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    for key, value in (("reduce_bucket_size", BUCKET_CAP), ("allgather_bucket_size", BUCKET_CAP),
                       ("stage3_prefetch_bucket_size", BUCKET_CAP), ("stage3_param_persistence_threshold", int(1e5))):
        if zero.get(key) == "auto":
            zero[key] = value
    return ds


def _find_auto(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def engine_config(ds_config: dict[str, Any], hidden_size: int | None, num_params: int,
                  steps_per_micro_batch: int = 1) -> dict[str, Any]:
    """The driver's DeepSpeed config for one worker's engine: the bucket sizes that depend on the model
    filled from it (:func:`fill_model_sizes`), and DeepSpeed's accumulation counting each micro-batch
    as ``steps_per_micro_batch`` micro-steps (GradCache's chunks: ``bge_ray.model.grad_cache.micro_steps``)."""
    ds = fill_model_sizes(ds_config, hidden_size, num_params)
    if steps_per_micro_batch > 1:
        ds["gradient_accumulation_steps"] *= steps_per_micro_batch
        ds["train_batch_size"] *= steps_per_micro_batch
    return ds
