"""Optimizer and learning-rate schedule (used when the DeepSpeed config names none)."""

from __future__ import annotations

from typing import Any

import torch

from bge_ray.config import FinetuneConfig


def linear_schedule(warmup_steps: int, total_steps: int):
    """HF's 'linear' schedule: warm up from 0, then decay linearly to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, use_gpu: bool) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (as HF's Trainer does)."""
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
