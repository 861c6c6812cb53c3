"""Optimizer and learning-rate schedule, as HF's Trainer builds them (used when the DeepSpeed config
names none)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

from bge_ray.config.finetune import FinetuneConfig


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, use_gpu: bool) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (as HF's Trainer does); fused on GPUs."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if use_gpu:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """HF's ``linear`` schedule (transformers' own factory): warm up from 0, then decay linearly to 0."""
    return get_scheduler("linear", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
