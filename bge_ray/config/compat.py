"""The flags of a FlagEmbedding command (its embedder runner's arguments and HF ``TrainingArguments``)
that ``bge-ray train`` has no field for, and what it does with each, so a working command moves over
unchanged and nothing it carries is dropped without a word:

* ``NO_EFFECT``: accepted with any value; it changes how HF's Trainer executes (its DataLoader, DDP,
  logging), never what is trained. A line names each one given and why it does nothing here.
* ``AT_DEFAULT``: accepted at the value(s) bge-ray behaves as, refused at any other with the reason.
* ``CONVERTED``: another spelling of a bge-ray field (HF's older names, ``use_cpu``).

A test walks every field of the installed ``TrainingArguments`` and FlagEmbedding's argument classes
through these tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bge_ray.errors import ConfigError

_DATALOADER = "Ray Data reads, samples and tokenizes in its own tasks; there is no DataLoader"
_DDP = "each worker is a DeepSpeed engine, not DDP"
_LOGS = "bge-ray's console, metrics.jsonl and trackers replace HF's logging"
_HUB = "bge-ray does not upload models: push output_dir with `hf upload`"
_EVAL = "bge-ray validates retrieval on eval_data (eval_strategy, eval_steps, metric_for_best_model)"
_PEFT_START = ("starting from another run's LoRA adapters is not supported yet: merge them into the model first "
               "(peft's merge_and_unload) and fine-tune that")
_HF_ONLY = "an HF Trainer feature bge-ray does not have"

NO_EFFECT: dict[str, str] = {
    "ddp_backend": "Ray Train picks gloo on CPU and nccl on GPU",
    "ddp_find_unused_parameters": _DDP, "ddp_timeout": _DDP, "ddp_bucket_cap_mb": _DDP,
    "ddp_broadcast_buffers": _DDP, "ddp_static_graph": _DDP,
    "local_rank": "set by Ray Train",
    "dataloader_num_workers": _DATALOADER, "dataloader_pin_memory": _DATALOADER,
    "dataloader_persistent_workers": _DATALOADER, "dataloader_prefetch_factor": _DATALOADER,
    "dataloader_multiprocessing_context": _DATALOADER, "dataloader_in_order": _DATALOADER,
    "remove_unused_columns": _DATALOADER, "length_column_name": _DATALOADER,
    "log_level": _LOGS, "log_level_replica": _LOGS, "log_on_each_node": _LOGS, "disable_tqdm": _LOGS,
    "logging_nan_inf_filter": _LOGS, "skip_memory_metrics": _LOGS, "project": _LOGS,
    "include_num_input_tokens_seen": "bge-ray logs tokens/s and tokens per window",
    "include_tokens_per_second": "bge-ray logs tokens/s",
    "logging_first_step": "bge-ray always reports the first optimizer step",
    "logging_dir": "tensorboard event files go to the run folder under storage_path",
    "save_on_each_node": "checkpoints go to storage_path, which every node reaches",
    "do_train": "bge-ray train trains",
    "per_device_eval_batch_size": "validation encodes eval_batch_size texts at a time",
    "eval_on_start": "with eval_data, bge-ray always measures step 0 (the zero-shot model)",
    "prediction_loss_only": _EVAL,
    "torch_empty_cache_steps": "bge-ray leaves the CUDA cache to PyTorch",
    "average_tokens_across_devices": "the contrastive loss is a mean over queries, not tokens",
    "config_name": "FlagEmbedding's embedder runner reads it only for a log line; the model's own config is used",
    "tokenizer_name": "FlagEmbedding's embedder runner does not read it; the tokenizer comes from model_name_or_path",
    "use_slow_tokenizer": "FlagEmbedding's runners do not read it; use_fast_tokenizer picks the tokenizer",
    "max_len": "FlagEmbedding's reranker runner does not read it: a pair is cut to query_max_len + passage_max_len "
               "tokens, there as here",
}

AT_DEFAULT: dict[str, tuple[tuple[Any, ...], str]] = {
    "dataloader_drop_last": ((True,), "bge-ray always drops the last incomplete batch, so every worker runs "
                                      "the same steps"),
    "token": ((None,), "credentials stay out of configs, which are saved with runs and models: export HF_TOKEN "
                       "(FlagEmbedding's default too; on a cluster, in the job's runtime_env env_vars)"),
    "push_to_hub": ((False,), _HUB), "hub_token": ((None,), _HUB), "hub_private_repo": ((None, False), _HUB),
    "hub_model_id": ((None,), _HUB), "hub_strategy": (("every_save",), _HUB), "hub_always_push": ((False,), _HUB),
    "hub_revision": ((None,), _HUB), "push_to_hub_model_id": ((None,), _HUB),
    "push_to_hub_organization": ((None,), _HUB), "push_to_hub_token": ((None,), _HUB),
    "torch_compile": ((False,), "not supported yet: bge-ray does not compile the DeepSpeed engine's model"),
    "torch_compile_backend": ((None,), "torch_compile is not supported yet"),
    "torch_compile_mode": ((None,), "torch_compile is not supported yet"),
    "fsdp": ((None, "", False), "bge-ray shards with DeepSpeed ZeRO (deepspeed: zero3), not FSDP"),
    "fsdp_config": ((None,), "bge-ray shards with DeepSpeed ZeRO (deepspeed: zero3), not FSDP"),
    "optim_args": ((None,), "bge-ray's AdamW takes its settings from adam_beta1/2, adam_epsilon, weight_decay"),
    "optim_target_modules": ((None,), _HF_ONLY),
    "label_smoothing_factor": ((0,), "the contrastive loss has no label smoothing"),
    "bf16_full_eval": ((False,), "validation encodes in fp32 on CPU and in bf16/fp16 on GPUs"),
    "fp16_full_eval": ((False,), "validation encodes in fp32 on CPU and in bf16/fp16 on GPUs"),
    "gradient_checkpointing_kwargs": ((None,), "bge-ray's gradient checkpointing is non-reentrant, fixed"),
    "activation_checkpointing": ((None,), "use gradient_checkpointing"),
    "activation_checkpointing_kwargs": ((None,), "use gradient_checkpointing"),
    "use_liger_kernel": ((False,), _HF_ONLY), "liger_kernel_config": ((None,), _HF_ONLY),
    "neftune_noise_alpha": ((None,), _HF_ONLY), "use_cache": ((False,), "training never uses a KV cache"),
    "auto_find_batch_size": ((False,), _HF_ONLY), "full_determinism": ((False,), _HF_ONLY),
    "accelerator_config": ((None,), _HF_ONLY), "parallelism_config": ((None,), _HF_ONLY), "debug": ((None, ""), _HF_ONLY),
    "train_sampling_strategy": (("random",), "bge-ray draws a fresh random order every epoch"),
    "label_names": ((None,), "the contrastive loss has no labels"),
    "restore_callback_states_from_checkpoint": ((False,), _HF_ONLY),
    "ignore_data_skip": ((False,), "a resumed run always continues at its data position"),
    "save_only_model": ((False,), "checkpoints keep the optimizer state, so runs can resume"),
    "save_safetensors": ((True,), "bge-ray always writes safetensors"),
    "enable_jit_checkpoint": ((False,), _HF_ONLY),
    "eval_delay": ((0,), _EVAL), "eval_do_concat_batches": ((True,), _EVAL), "eval_use_gather_object": ((False,), _EVAL),
    "include_for_metrics": ((None, "", ()), _EVAL), "batch_eval_metrics": ((False,), _EVAL),
    "eval_accumulation_steps": ((None,), _EVAL), "do_eval": ((False,), _EVAL), "do_predict": ((False,), _EVAL),
    "greater_is_better": ((None, True), "every retrieval metric bge-ray ranks by is better higher"),
    "trackio_space_id": ((None,), "report_to takes tensorboard, wandb or mlflow"),
    "trackio_bucket_id": ((None,), "report_to takes tensorboard, wandb or mlflow"),
    "trackio_static_space_id": ((None,), "report_to takes tensorboard, wandb or mlflow"),
    "jit_mode_eval": ((False,), _HF_ONLY), "use_ipex": ((False,), _HF_ONLY), "use_mps_device": ((False,), _HF_ONLY),
    "fp16_opt_level": (("O1",), "DeepSpeed runs fp16, not apex"), "half_precision_backend": (("auto",), "DeepSpeed runs fp16"),
    "past_index": ((-1,), _HF_ONLY), "tpu_num_cores": ((None,), _HF_ONLY),
    # FlagEmbedding's decoder-only embedder runners (LoRA, extra tokens: fields)
    "use_flash_attn": ((False,), "flash-attention 2 is not bundled with bge-ray; its PyTorch attention (sdpa) "
                                 "is used"),
    "peft_model_path": ((None, ""), _PEFT_START), "from_peft": ((None,), _PEFT_START), "raw_peft": ((None,), _PEFT_START),
    "only_merge_lora_model": ((False,), "bge-ray merges at export (save_merged_lora_model); to merge a finished "
                                        "run's adapters, use peft's merge_and_unload"),
}

CONVERTED = {
    "evaluation_strategy": lambda v: {"eval_strategy": v},   # HF's name before 4.46
    "use_cpu": lambda v: {"use_gpu": False} if _truth("use_cpu", v) else {},
    "no_cuda": lambda v: {"use_gpu": False} if _truth("no_cuda", v) else {},
    "load_best_model_at_end": lambda v: {"final_model": "best" if _truth("load_best_model_at_end", v) else "last"},
}


def _normal(value: Any) -> Any:
    """A command-line string or YAML value in a comparable form: None, bool, number, str or tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if not isinstance(value, str):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
        return number if math.isfinite(number) else text
    except ValueError:
        return text


def _truth(key: str, value: Any) -> bool:
    v = _normal(value)
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return v


class Flags:
    """A command's table of flags it has no field for (see the module's docstring)."""

    def __init__(self, no_effect: dict[str, str], at_default: dict[str, tuple[tuple[Any, ...], str]],
                 converted: dict[str, Callable[[Any], dict[str, Any]]] | None = None) -> None:
        self.no_effect, self.at_default, self.converted = no_effect, at_default, converted or {}

    def known(self, key: str) -> bool:
        return key in self.no_effect or key in self.at_default or key in self.converted

    def translate(self, key: str, value: Any) -> tuple[dict[str, Any], str | None]:
        """A flag -> (the fields it sets, a notice to print or None).

        Raises:
            ConfigError: it asks for what bge-ray does not do (the reason named).
        """
        if key in self.no_effect:
            return {}, f"--{key} has no effect here: {self.no_effect[key]}"
        if key in self.at_default:
            accepted, why = self.at_default[key]
            if _normal(value) in {_normal(a) for a in accepted} or (value == [] and () in accepted):
                return {}, None
            shown = "" if "token" in key else f" {value!r}"
            raise ConfigError(f"--{key}{shown} is not supported: {why}")
        return self.converted[key](value), None


TRAIN = Flags(NO_EFFECT, AT_DEFAULT, CONVERTED)

# FlagEmbedding's encoder-only reranker runner reads config_name (the config the model loads with)
RERANK_NO_EFFECT = {k: v for k, v in NO_EFFECT.items() if k != "config_name"}
RERANK = Flags(RERANK_NO_EFFECT, {**AT_DEFAULT, "config_name": ((None,), "bge-ray loads the model's own config (from "
                                                                         "model_name_or_path); put the config there")},
               CONVERTED)
