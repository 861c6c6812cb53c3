"""Optimizer and learning-rate schedule, as HF's Trainer builds them (used when the DeepSpeed config
names none)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

from bge_ray.config.finetune import FinetuneConfig


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (as HF's Trainer does), fused with
    ``adamw_torch_fused`` (HF's default from torch 2.8), on GPUs and CPUs alike."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, warmup_steps: int, total_steps: int) -> Any:
    """``lr_scheduler_type`` through transformers' own factory, as HF's Trainer builds it (``linear``:
    warm up from 0, then decay linearly to 0)."""
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    for name in ("num_cycles", "num_decay_steps", "num_stable_steps", "timescale"):
        if name in kwargs and float(kwargs[name]).is_integer():
            kwargs[name] = int(kwargs[name])
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs or None)
