"""bge_ray/model/optim.py: HF Trainer's AdamW parameter groups and its linear schedule."""

from __future__ import annotations

import math

import pytest
import torch

from bge_ray.config import ConfigError, FinetuneConfig
from bge_ray.model.embedder import Embedder
from bge_ray.model.optim import build_optimizer, build_scheduler


def test_no_weight_decay_on_biases_and_norms(tiny_model):
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=["x"], output_dir="o", weight_decay=0.1,
                         learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7)
    model = Embedder.from_pretrained(tiny_model)
    model.freeze_position_embeddings()
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) < len(list(model.parameters()))
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-7


def _lrs(warmup, total, **fields):
    cfg = FinetuneConfig(model_name_or_path="m", train_data=["x"], output_dir="o", **fields)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, cfg, warmup, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 10)])
def test_linear_schedule_warms_up_then_decays_to_zero(warmup, total):
    lrs = _lrs(warmup, total)
    for step, lr in enumerate(lrs):  # HF's "linear": step/warmup, then (total-step)/(total-warmup)
        want = step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
        assert lr == pytest.approx(2.0 * want)
    assert lrs[-1] == 0.0


def test_cosine_and_constant_schedules_follow_hf_formulas():
    lrs = _lrs(2, 10, lr_scheduler_type="cosine")
    for step, lr in enumerate(lrs[2:], start=2):  # 0.5 * (1 + cos(pi * progress)) after warmup
        assert lr == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
    assert lrs[:2] == [0.0, 1.0]
    assert _lrs(3, 10, lr_scheduler_type="constant_with_warmup")[3:] == [2.0] * 8
    restarts = _lrs(0, 10, lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2.0})
    assert restarts[5] == pytest.approx(2.0) and restarts[4] < 0.5  # a restart half way


@pytest.mark.parametrize("name, match", [("bogus", "lr_scheduler_type must be one of"),
                                         ("reduce_lr_on_plateau", "steps on an evaluation")])
def test_unknown_or_unsupported_schedulers_are_refused(tmp_path, name, match):
    data = tmp_path / "t.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(model_name_or_path="m", train_data=[str(data)], output_dir=str(tmp_path / "o"),
                       lr_scheduler_type=name).validate()


def test_fused_adamw_is_hfs_default_and_takes_the_unfused_update(tiny_model):
    """HF TrainingArguments (transformers 5, torch >= 2.8) default to fused AdamW, on CPUs too; bge-ray's
    default is the same, and its fused step moves the weights as the unfused one does."""
    from transformers import TrainingArguments

    assert FinetuneConfig().optim == TrainingArguments(output_dir="unused").optim == "adamw_torch_fused"
    steps = []
    for optim in ("adamw_torch_fused", "adamw_torch"):
        torch.manual_seed(0)
        model = Embedder.from_pretrained(tiny_model)
        cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=["x"], output_dir="o", optim=optim,
                             learning_rate=1e-3, weight_decay=0.01)
        opt = build_optimizer(model, cfg)
        assert opt.defaults.get("fused") is (True if optim == "adamw_torch_fused" else None)
        ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            q, p = model(ids, torch.ones_like(ids), ids.flip(0), torch.ones_like(ids))
            (q @ p.T).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        steps.append({n: w.detach().clone() for n, w in model.named_parameters()})
    start = dict(Embedder.from_pretrained(tiny_model).named_parameters())
    assert sum(not torch.equal(w, start[n]) for n, w in steps[0].items()) > len(start) // 2  # the steps moved them
    for name, w in steps[0].items():
        torch.testing.assert_close(w, steps[1][name], rtol=1e-5, atol=1e-6)
