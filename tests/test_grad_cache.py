"""GradCache (``sub_batch_size``): its gradients are the full batch's, in process and under DeepSpeed ZeRO-2
and ZeRO-3 on two Ray Train workers with cross-device negatives."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bge_ray.model.embedder import Embedder
from bge_ray.model.grad_cache import micro_steps, train_micro_batch, trim_right_padding
from bge_ray.model.loss import contrastive_loss
from bge_ray.model.tokenizer import load_tokenizer

QUERIES = ["what causes rain", "how do vaccines work", "who wrote hamlet", "speed of light", "why is the sky blue"]


def _batch(tokenizer, n_queries: int, group: int) -> dict[str, torch.Tensor]:
    queries = QUERIES[:n_queries]
    passages = [f"passage {j} about {q}" + " and more words" * (j % 3) for q in queries for j in range(group)]
    q = tokenizer(queries, padding=True, return_tensors="pt")
    p = tokenizer(passages, padding=True, return_tensors="pt")
    return {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
            "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"]}


class Plain:
    """A model behind the engine interface train_micro_batch uses: torch's backward, divided like DeepSpeed's
    by the micro-steps per optimizer step; no optimizer."""

    def __init__(self, model: torch.nn.Module, steps: int = 1) -> None:
        self.model, self.steps = model, steps

    def __call__(self, *args):
        return self.model(*args)

    def gradient_accumulation_steps(self) -> int:
        return self.steps

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.steps).backward()

    def step(self) -> None:
        pass


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float64 rounding, relative to the tensor's own scale. (In float32 this tiny random model
    at temperature 0.05 computes the same gradient only to ~0.5%, whichever way it is batched; a wrong
    scale, mask or dropout shows as differences of the gradient's own size.)"""
    return bool((a - b).abs().max() <= 1e-9 * b.abs().max() + 1e-15)


def _model(path: str, pooling: str, dropout: float, dtype: torch.dtype = torch.float64) -> Embedder:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    model = Embedder(AutoModel.from_pretrained(path, config=config), pooling=pooling).to(dtype)
    model.train()
    return model


@pytest.mark.parametrize("pooling,kd", [("mean", False), ("cls", True)])
def test_gradients_equal_the_full_batch_gradients(tiny_model, pooling, kd):
    model = _model(tiny_model, pooling, dropout=0.0)
    batch = _batch(load_tokenizer(tiny_model), n_queries=5, group=4)
    teacher = torch.randn(5, 4, dtype=torch.float64) if kd else None

    def loss_fn(q, p):
        return contrastive_loss(q, p, 0.05, teacher_scores=teacher)

    full_loss = train_micro_batch(Plain(model), batch, loss_fn)
    full = _grads(model)
    for sub in (1, 3, 7):
        loss = train_micro_batch(Plain(model, micro_steps(5, 4, sub)), batch, loss_fn, sub_batch_size=sub)
        cached = _grads(model)
        assert torch.allclose(loss, full_loss, atol=1e-6)
        assert cached.keys() == full.keys() and len(full) > 10
        for name, g in full.items():  # equal up to float rounding (chunks pad to their own length)
            assert _close(cached[name], g), (sub, name, (cached[name] - g).abs().max(), g.abs().max())


def test_dropout_is_replayed_in_the_second_forward(tiny_model):
    """With dropout on, the gradient is that of the loss on the cached embeddings: the second, autograd
    forward of each chunk must draw the same dropout masks. Reference: the same chunks encoded with
    autograd kept (FlagEmbedding's sub_batch_size), from the same seed."""
    model = _model(tiny_model, "mean", dropout=0.3)
    batch = _batch(load_tokenizer(tiny_model), n_queries=4, group=3)
    sub = 5

    def loss_fn(q, p):
        return contrastive_loss(q, p, 0.05)

    def encode_chunks(side: str, n: int) -> torch.Tensor:  # each chunk padded to its own longest, as GradCache does
        return torch.cat([model.encode(*trim_right_padding(batch[f"{side}_input_ids"][i:i + sub],
                                                             batch[f"{side}_attention_mask"][i:i + sub]))
                          for i in range(0, n, sub)])

    torch.manual_seed(7)
    q, p = encode_chunks("q", 4), encode_chunks("p", 12)
    reference_loss = loss_fn(q, p)
    reference_loss.backward()
    reference = _grads(model)
    torch.manual_seed(7)
    engine = Plain(model, micro_steps(4, 3, sub))
    loss = train_micro_batch(engine, batch, loss_fn, sub_batch_size=sub)
    cached = _grads(model)
    assert torch.allclose(loss, reference_loss.detach(), atol=1e-6)
    for name, g in reference.items():
        assert _close(cached[name], g), name
    # and dropout really was on: another seed gives another loss
    torch.manual_seed(8)
    assert not torch.allclose(train_micro_batch(engine, batch, loss_fn, sub_batch_size=sub), loss)


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):  # ZeRO-3 holds a shard of each
        return {n: p.detach().clone() for n, p in params}


def _deepspeed_worker(config: dict) -> None:
    """On each of 2 workers: two ZeRO engines from the same weights, plain SGD (lr 1, so a step moves
    each weight by exactly minus its reduced gradient); one step on the full batch, one with GradCache;
    cross-device negatives and distillation on. Rank 0 writes the largest weight difference."""
    import deepspeed
    import torch.distributed as dist

    from bge_ray.config.deepspeed import engine_config

    rank = dist.get_rank()
    tok = load_tokenizer(config["model"])
    batch = _batch(tok, n_queries=4, group=3)
    if rank == 1:  # each worker its own batch
        batch = {k: v.flip(0) for k, v in batch.items()}
    teacher = torch.arange(12, dtype=torch.float32).view(4, 3) * (rank + 1) / 10

    def loss_fn(q, p):  # temperature 0.2: float32 rounding stays ~1e-5 of the gradient (DeepSpeed: no float64)
        return contrastive_loss(q, p, 0.2, teacher_scores=teacher, cross_device=True)

    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
                 "zero_optimization": {"stage": config["stage"], "reduce_bucket_size": 10**5,
                                       "allgather_bucket_size": 10**5},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    weights = []
    for sub in (None, 2):
        model = _model(config["model"], "mean", dropout=0.0, dtype=torch.float32)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=engine_config(ds_config, model.model.config.hidden_size,
                                                                sum(p.numel() for p in model.parameters()),
                                                                micro_steps(4, 3, sub)),
                                          dist_init_required=False)
        before = _full_weights(engine)
        train_micro_batch(engine, batch, loss_fn, sub_batch_size=sub)
        assert engine.global_steps == 1  # one optimizer step, however many chunks
        weights.append(_full_weights(engine))
    moved = max((weights[0][n] - before[n]).abs().max().item() for n in before)
    diff = max((weights[0][n] - weights[1][n]).abs().max().item() for n in before)
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump({"moved": moved, "diff": diff}, f)


@pytest.mark.parametrize("stage", [2, 3])
def test_gradcache_step_equals_full_batch_step_under_zero_on_two_workers(ray_cluster, tiny_model, tmp_path, stage):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = str(tmp_path / "result.json")
    TorchTrainer(
        _deepspeed_worker, train_loop_config={"model": tiny_model, "out": out, "stage": stage},
        scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name=f"gradcache-zero{stage}"),
    ).fit()
    assert os.path.exists(out)
    with open(out) as f:
        result = json.load(f)
    assert result["moved"] > 1e-4  # the step did something
    # equal up to float32 rounding; wrong accumulation across chunks or ranks is off by the step's own size
    assert result["diff"] < 1e-3 * result["moved"], result


def test_chunks_drop_their_own_right_padding_only():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = (ids != 0).long()
    t_ids, t_mask = trim_right_padding(ids, mask)
    assert t_ids.tolist() == [[5, 6], [7, 0]] and t_mask.tolist() == [[1, 1], [1, 0]]
    left = torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]])
    assert trim_right_padding(left, (left != 0).long())[0] is left  # positions would move: untouched
