"""bge_ray/train/plan.py and the driver's choices in bge_ray/train/launch.py: the step arithmetic, which
run a rerun continues, which checkpoint's model is exported. No cluster: real checkpoint folders."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from ray.train import Checkpoint, Result

from bge_ray.config import FinetuneConfig
from bge_ray.errors import ConfigError
from bge_ray.train.launch import (
    best_checkpoint,
    default_run_name,
    latest_state,
    resolve_run_name,
    save_run_config,
)
from bge_ray.train.plan import TrainPlan


def _cfg(tmp_path, **values):
    return FinetuneConfig(model_name_or_path="m", train_data=["x"], output_dir=str(tmp_path / "out"), **values)


@pytest.mark.parametrize("rows, values, want", [
    # 400 rows over 2 workers of batch 4: 50 micro-batches each, one step each
    (400, dict(num_workers=2, per_device_train_batch_size=4), (50, 50, 150, 3, 0)),
    # the remainder after the equal split and after whole batches is dropped: 203 -> 101 -> 25
    (203, dict(num_workers=2, per_device_train_batch_size=4, num_train_epochs=1), (25, 25, 25, 1, 0)),
    # accumulation: 12 micro-batches make 3 steps; 1.5 epochs round up to whole steps
    (48, dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_train_epochs=1.5), (12, 3, 5, 2, 0)),
    # max_steps wins over epochs; warmup_ratio of it, rounded up
    (400, dict(num_workers=2, per_device_train_batch_size=4, max_steps=70, warmup_ratio=0.1), (50, 50, 70, 2, 7)),
    (400, dict(num_workers=2, per_device_train_batch_size=4, warmup_steps=9, warmup_ratio=0.5), (50, 50, 150, 3, 9)),
])
def test_train_plan(tmp_path, rows, values, want):
    plan = TrainPlan.make(_cfg(tmp_path, **values), rows)
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.num_epochs,
            plan.warmup_steps) == want


def test_train_plan_position_and_too_little_data(tmp_path):
    plan = TrainPlan.make(_cfg(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2), 80)
    assert plan.steps_per_epoch == 10
    assert plan.position(0, 2) == (0, 0) and plan.position(13, 2) == (1, 6) and plan.position(20, 2) == (2, 0)
    with pytest.raises(ConfigError, match=r"7 training rows are fewer than one optimizer step needs \(8 ="):
        TrainPlan.make(_cfg(tmp_path, num_workers=2, per_device_train_batch_size=4), 7)


def _checkpoint(run_dir, step, **state):
    path = run_dir / f"checkpoint_step_{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, **state}))
    return path


def test_which_run_a_rerun_continues(tmp_path):
    cfg = _cfg(tmp_path)
    storage = str(tmp_path / "runs")
    run = default_run_name(cfg)
    runs = tmp_path / "runs" / run
    assert run.startswith("bge-ray-out-")
    assert resolve_run_name(cfg, storage) == (run, None)  # nothing there: a new run
    runs.mkdir(parents=True)
    assert latest_state(storage, run) == {}
    assert resolve_run_name(cfg, storage) == (run, 0)  # started, no checkpoint yet: continue
    _checkpoint(runs, 10)
    _checkpoint(runs, 20)
    assert resolve_run_name(cfg, storage) == (run, 20)  # the newest checkpoint
    never = _cfg(tmp_path, resume="never")
    name, resumed = resolve_run_name(never, storage)
    assert name.startswith(run + "-") and resumed is None
    _checkpoint(runs, 30, final=True)
    name, resumed = resolve_run_name(cfg, storage)  # finished: never touched again
    assert name.startswith(run + "-") and resumed is None
    assert resolve_run_name(_cfg(tmp_path, run_name="mine"), storage) == ("mine", None)
    (runs / "checkpoint_step_00000040").mkdir()
    (runs / "checkpoint_step_00000040" / "trainer_state.json").write_text("{oops")
    with pytest.raises(ValueError, match="trainer_state.json is unreadable"):
        resolve_run_name(cfg, storage)


def test_two_projects_out_folders_are_two_runs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = dataclasses.replace(_cfg(tmp_path), output_dir=str(tmp_path / "a" / "out"))
    two = dataclasses.replace(_cfg(tmp_path), output_dir=str(tmp_path / "b" / "out"))
    assert default_run_name(one) != default_run_name(two)
    assert default_run_name(one).startswith("bge-ray-out-") and default_run_name(one) == default_run_name(one)


def test_an_unfinished_run_is_not_resumed_with_another_config(tmp_path):
    storage = str(tmp_path / "runs")
    cfg = _cfg(tmp_path)
    save_run_config(cfg, storage, default_run_name(cfg))
    _checkpoint(tmp_path / "runs" / default_run_name(cfg), 10)
    changed = dataclasses.replace(cfg, temperature=0.05, learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"another config \(learning_rate: .*; temperature: 0.02 then, 0.05 now\)"):
        resolve_run_name(changed, storage)
    # where and how it runs may change; what it trains may not
    assert resolve_run_name(dataclasses.replace(cfg, logging_steps=7, max_failures=3), storage)[1] == 10
    fresh, resumed = resolve_run_name(dataclasses.replace(changed, resume="never"), storage)
    assert fresh != default_run_name(cfg) and resumed is None


def _result(tmp_path, scores):
    """A finished run's Result as Ray Train hands it over: its checkpoints with their metrics."""
    best = []
    for step, score in scores:
        path = tmp_path / f"checkpoint_step_{step:08d}"
        path.mkdir()
        best.append((Checkpoint(str(path)), {"step": step, "eval_ndcg@10": score, "eval_mrr@10": score / 2}))
    last = best[-1]
    return Result(metrics=dict(last[1], train_loss=0.5), checkpoint=last[0], error=None, path=str(tmp_path),
                  best_checkpoints=best, metrics_dataframe=None)


def test_the_best_validated_checkpoint_is_exported(tmp_path):
    result = _result(tmp_path, [(5, 0.61), (10, 0.70), (15, 0.66)])
    cfg = _cfg(tmp_path, eval_data=str(tmp_path))
    chosen, metrics = best_checkpoint(result, cfg)
    assert chosen.path.endswith("checkpoint_step_00000010")
    assert metrics["best_step"] == 10 and metrics["best_eval_ndcg@10"] == 0.70 and metrics["best_eval_mrr@10"] == 0.35
    assert metrics["train_loss"] == 0.5 and metrics["eval_ndcg@10"] == 0.66  # the final report stays as it was
    by_mrr = best_checkpoint(result, _cfg(tmp_path, eval_data=str(tmp_path), metric_for_best_model="mrr@10"))[0]
    assert by_mrr.path.endswith("checkpoint_step_00000010")
    last, metrics = best_checkpoint(result, _cfg(tmp_path, eval_data=str(tmp_path), final_model="last"))
    assert last.path.endswith("checkpoint_step_00000015") and "best_step" not in metrics
    no_eval, _ = best_checkpoint(result, _cfg(tmp_path))
    assert no_eval.path.endswith("checkpoint_step_00000015")
    assert os.path.isdir(chosen.path)
