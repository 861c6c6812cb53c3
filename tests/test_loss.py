"""bge_ray/model/loss.py against an independent float64 reference, in one process and across 2 gloo processes."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bge_ray.model.embedder import Embedder
from bge_ray.model.loss import contrastive_loss, matryoshka_loss
from tests.flagembedding_compat import import_flag_model

T = 0.05


def _logsumexp(x):
    m = max(x)
    return m + math.log(sum(math.exp(v - m) for v in x))


def ref_infonce(q, p, temperature):
    """Plain-Python InfoNCE: each query against every passage, its positive at i*G."""
    b, g = len(q), len(p) // len(q)
    total = 0.0
    for i in range(b):
        logits = [float(np.dot(q[i], p[j])) / temperature for j in range(len(p))]
        total += _logsumexp(logits) - logits[i * g]
    return total / b


def ref_kl(q, p, teacher, temperature):
    b, g = len(q), len(p) // len(q)
    total = 0.0
    for i in range(b):
        t = np.exp(teacher[i] - teacher[i].max())
        t = t / t.sum()
        s = [float(np.dot(q[i], p[i * g + j])) / temperature for j in range(g)]
        lse = _logsumexp(s)
        total += -sum(t[j] * (s[j] - lse) for j in range(g))
    return total / b


def ref_m3(q, p, teacher, temperature):
    b, g = len(q), len(p) // len(q)
    total = 0.0
    for j in range(g):
        acc = 0.0
        for i in range(b):
            t = np.exp(teacher[i] - teacher[i].max())
            t = t / t.sum()
            logits = [float(np.dot(q[i], p[k])) / temperature for k in range(len(p))]
            kept = [v for k, v in enumerate(logits) if not (i * g <= k < i * g + j)]
            acc += t[j] * (_logsumexp(kept) - logits[i * g + j])
        total += acc / b
    return total


def _data(b=3, g=4, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(b * g, d, generator=gen, dtype=torch.float64), dim=-1)
    teacher = torch.randn(b, g, generator=gen, dtype=torch.float64) * 3
    return q, p, teacher


def test_in_batch_with_hard_negatives_matches_reference():
    q, p, _ = _data()
    got = contrastive_loss(q, p, temperature=T)
    assert got.item() == pytest.approx(ref_infonce(q.numpy(), p.numpy(), T), rel=1e-9)


def test_group_size_one_is_in_batch_only():
    q, p, _ = _data(b=4, g=1)
    got = contrastive_loss(q, p, temperature=T)
    assert got.item() == pytest.approx(ref_infonce(q.numpy(), p.numpy(), T), rel=1e-9)
    # with G=1 the target of query i is passage i
    assert got.item() == pytest.approx(F.cross_entropy(q @ p.T / T, torch.arange(4)).item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0, 7.0])
def test_temperature_divides_the_scores(temperature):
    q, p, _ = _data()
    got = contrastive_loss(q, p, temperature).item()
    assert got == pytest.approx(ref_infonce(q.numpy(), p.numpy(), temperature), rel=1e-9)
    # the same loss as unit temperature on scores scaled by 1/temperature
    assert got == pytest.approx(contrastive_loss(q / temperature, p, 1.0).item(), rel=1e-9)


def test_a_very_high_temperature_makes_every_passage_equally_likely():
    q, p, _ = _data(b=4, g=3)
    assert contrastive_loss(q, p, 1e9).item() == pytest.approx(math.log(4 * 3), rel=1e-6)


def test_kl_div_distillation_matches_reference():
    q, p, teacher = _data()
    got = contrastive_loss(q, p, T, teacher_scores=teacher, kd_loss_type="kl_div")
    want = ref_kl(q.numpy(), p.numpy(), teacher.numpy(), T) + ref_infonce(q.numpy(), p.numpy(), T)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_m3_kd_loss_matches_reference():
    q, p, teacher = _data()
    got = contrastive_loss(q, p, T, teacher_scores=teacher, kd_loss_type="m3_kd_loss")
    assert got.item() == pytest.approx(ref_m3(q.numpy(), p.numpy(), teacher.numpy(), T), rel=1e-9)


def test_matryoshka_loss_is_the_mean_or_weighted_sum_of_the_loss_at_each_cut():
    q, p, teacher = _data(d=12)

    def cut(x, d):
        return F.normalize(x[:, :d], dim=-1).numpy()

    per_dim = [ref_infonce(cut(q, d), cut(p, d), T) for d in (12, 6, 3)]
    assert matryoshka_loss(q, p, [12, 6, 3], temperature=T).item() == pytest.approx(np.mean(per_dim), rel=1e-9)
    weighted = matryoshka_loss(q, p, [12, 6, 3], weights=[1.0, 0.5, 2.0], temperature=T)
    assert weighted.item() == pytest.approx(per_dim[0] + 0.5 * per_dim[1] + 2 * per_dim[2], rel=1e-9)
    kd = matryoshka_loss(q, p, [4], temperature=T, teacher_scores=teacher, kd_loss_type="m3_kd_loss")
    assert kd.item() == pytest.approx(ref_m3(cut(q, 4), cut(p, 4), teacher.numpy(), T), rel=1e-9)
    raw = matryoshka_loss(q * 3, p, [5], normalize=False, temperature=T)  # no normalisation: the plain cut
    assert raw.item() == pytest.approx(ref_infonce((q * 3)[:, :5].numpy(), p[:, :5].numpy(), T), rel=1e-9)
    with pytest.raises(ValueError, match="at most the embedding size 12"):
        matryoshka_loss(q, p, [16], temperature=T)
    with pytest.raises(ValueError, match="2 weights for 1"):
        matryoshka_loss(q, p, [4], weights=[1.0, 1.0], temperature=T)


def test_matryoshka_loss_and_gradients_match_flagembedding_use_mrl():
    """FlagEmbedding 1.4.2's encoder-only model with use_mrl, on a float64 BERT: the same loss and gradients."""
    import_flag_model()
    from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = BertModel(config).double()
    gen = torch.Generator().manual_seed(3)
    q = {"input_ids": torch.randint(1, 50, (2, 5), generator=gen), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    p = {"input_ids": torch.randint(1, 50, (6, 7), generator=gen), "attention_mask": torch.ones(6, 7, dtype=torch.long)}
    p["attention_mask"][:, 5:] = 0
    fe = BiEncoderOnlyEmbedderModel(base, temperature=T, sentence_pooling_method="cls", normalize_embeddings=True,
                                    use_mrl=True, mrl_dims=[16, 8, 4])
    fe.train()
    want = fe(queries=q, passages=p).loss
    want.backward()
    want_grads = {n: t.grad.clone() for n, t in base.named_parameters() if t.grad is not None}
    base.zero_grad()
    ours = Embedder(base, pooling="cls", normalize=True)
    got = matryoshka_loss(ours.encode(q["input_ids"], q["attention_mask"]),
                          ours.encode(p["input_ids"], p["attention_mask"]), [16, 8, 4], temperature=T)
    got.backward()
    # FlagEmbedding sums the per-dim losses into a float32 zero in place: agreement to float32's precision
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert want_grads and set(want_grads) == {n for n, t in base.named_parameters() if t.grad is not None}
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(base.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-9)


def test_bad_arguments_are_rejected():
    q, p, _ = _data()
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(q, p, 0.0)
    with pytest.raises(ValueError, match="kd_loss_type"):
        contrastive_loss(q, p, T, kd_loss_type="mse")
    with pytest.raises(ValueError, match="whole number of groups"):
        contrastive_loss(q, p[:-1], T)


# ---- cross-device: 2 real gloo processes --------------------------------------------------------

def _encode(weight, x):
    return F.normalize(x @ weight, dim=-1)


def _worker(rank, world, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    b, g, d_in, d = 2, 3, 6, 5
    gen = torch.Generator().manual_seed(1)
    weight0 = torch.randn(d_in, d, generator=gen, dtype=torch.float64)
    xq = torch.randn(world * b, d_in, generator=gen, dtype=torch.float64)
    xp = torch.randn(world * b * g, d_in, generator=gen, dtype=torch.float64)
    teacher = torch.randn(world * b, g, generator=gen, dtype=torch.float64)
    weight = weight0.clone().requires_grad_(True)
    sl_q, sl_p = slice(rank * b, (rank + 1) * b), slice(rank * b * g, (rank + 1) * b * g)
    kd = None if mode == "hard" else mode
    loss = contrastive_loss(_encode(weight, xq[sl_q]), _encode(weight, xp[sl_p]), T,
                            teacher_scores=teacher[sl_q] if kd else None, kd_loss_type=kd or "kl_div",
                            cross_device=True)
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what data-parallel training does: average the workers' gradients
    grad /= world
    value = loss.detach().clone()
    dist.all_reduce(value)
    value /= world
    if rank == 0:
        torch.save({"loss": value, "grad": grad, "weight0": weight0, "xq": xq, "xp": xp, "teacher": teacher},
                   os.path.join(out_dir, "out.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes in a gloo group
@pytest.mark.parametrize("mode", ["hard", "kl_div", "m3_kd_loss"])
def test_cross_device_equals_single_process_global_batch(mode):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, mode), nprocs=2, join=True)
        out = torch.load(os.path.join(tmp, "out.pt"))
    weight = out["weight0"].clone().requires_grad_(True)
    kd = None if mode == "hard" else mode
    single = contrastive_loss(_encode(weight, out["xq"]), _encode(weight, out["xp"]), T,
                              teacher_scores=out["teacher"] if kd else None, kd_loss_type=kd or "kl_div")
    single.backward()
    assert out["loss"].item() == pytest.approx(single.item(), rel=1e-9)
    torch.testing.assert_close(out["grad"], weight.grad, rtol=1e-9, atol=1e-12)
