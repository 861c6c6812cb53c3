"""The step arithmetic of a fine-tune, decided once on the driver from the data's global batches and
the config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bge_ray.config.finetune import FinetuneConfig
from bge_ray.errors import ConfigError


@dataclass(frozen=True)
class TrainPlan:
    """How many micro-batches and optimizer steps a run takes (every worker runs the same)."""

    num_rows: int
    micro_batches_per_epoch: int   # global batches an epoch: every worker trains its slice of each
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int

    @classmethod
    def make(cls, cfg: FinetuneConfig, num_rows: int, global_batches: int | None = None) -> TrainPlan:
        """The plan for ``num_rows`` usable rows cut into ``global_batches`` batches an epoch (unset: one
        data set of ``per_device_train_batch_size`` x ``num_workers`` rows a batch).

        Raises:
            ConfigError: the rows are fewer than one optimizer step needs.
        """
        micro = global_batches if global_batches is not None else (
            num_rows // (cfg.num_workers * cfg.per_device_train_batch_size))
        steps_per_epoch = micro // cfg.gradient_accumulation_steps
        if steps_per_epoch < 1:
            need = cfg.num_workers * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
            raise ConfigError(
                f"{num_rows} training rows are fewer than one optimizer step needs ({need} = num_workers "
                f"{cfg.num_workers} x per_device_train_batch_size {cfg.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {cfg.gradient_accumulation_steps}): add data or lower one of these")
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
        epochs = math.ceil(total / steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
        return cls(num_rows, micro, steps_per_epoch, total, epochs, warmup)

    def position(self, global_step: int, gradient_accumulation_steps: int) -> tuple[int, int]:
        """(epoch, micro-batches already trained in it) of a run at ``global_step``."""
        return (global_step // self.steps_per_epoch,
                (global_step % self.steps_per_epoch) * gradient_accumulation_steps)
