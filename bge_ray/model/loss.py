"""Contrastive loss with FlagEmbedding's semantics (InfoNCE, in-batch and cross-device negatives, KD).

Shapes: ``q`` is (B, D) query embeddings, ``p`` is (B*G, D) passage embeddings laid out in
groups of G = train_group_size: row ``i*G`` is query i's positive, rows ``i*G+1 .. i*G+G-1`` its
hard negatives.

Hard loss (InfoNCE)::

    scores = q @ p.T / temperature            # (B, B*G): every passage of the batch competes
    loss   = cross_entropy(scores, target)    # target[i] = i * G

With ``cross_device=True`` q and p are all-gathered across workers first (the local slice keeps
its gradient), so every query also sees every other worker's passages; the loss is then the
mean over the global batch, identical to a single process holding the whole batch. Its
gradient is scaled by the world size (value unchanged) so that, once DeepSpeed averages the
workers' gradients, the update is exactly the gradient of that global loss. (FlagEmbedding
leaves it 1/world_size too small; with Adam this mostly matters through gradient clipping.)

Knowledge distillation (``teacher_scores``: (B, G), one score per passage of the query's group;
targets = softmax(teacher_scores)):

* ``kl_div``: soft cross-entropy ``-sum(targets * log_softmax(student_group_scores))``, averaged
  over queries and added to the hard loss. ``student_group_scores`` are the query's scores over
  its own group.
* ``m3_kd_loss`` (BGE-M3): for each group position j, a cross-entropy against passage ``i*G+j``
  over all passages of the batch, with the passages of earlier positions masked out, weighted by
  ``targets[:, j]``; replaces the hard loss.

Matryoshka (``use_mrl``): :func:`matryoshka_loss` is the contrastive loss above at each of the
dimensions ``d`` (embeddings cut to their first ``d`` values and, with normalisation on, normalised
again; cutting a normalised vector and normalising equals normalising the cut one), averaged as
FlagEmbedding's, or summed with weights as sentence-transformers' ``MatryoshkaLoss``.

Example::

    >>> q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    >>> p = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    >>> contrastive_loss(q, p, temperature=0.02).shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bge_ray.config.finetune import KD_LOSS_TYPES


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather ``t`` along dim 0; only the local slice carries gradient (as in FlagEmbedding)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


def _global_grad(x: torch.Tensor) -> torch.Tensor:
    """Same value, gradient times world size: undoes the data-parallel gradient average."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    w = dist.get_world_size()
    return x if w == 1 else x * w - x.detach() * (w - 1)


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """From (B, B*G) scores take each query's own group: (B, G)."""
    b = scores.size(0)
    rows = torch.arange(b, device=scores.device).unsqueeze(1)
    cols = rows * group_size + torch.arange(group_size, device=scores.device).unsqueeze(0)
    return scores[rows, cols]


def kl_div_loss(student_group_scores: torch.Tensor, teacher_targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the student's group scores against the teacher's distribution."""
    return -(F.log_softmax(student_group_scores, dim=-1) * teacher_targets).sum(dim=-1).mean()


def m3_kd_loss(scores: torch.Tensor, teacher_targets: torch.Tensor, group_size: int) -> torch.Tensor:
    """BGE-M3's distillation loss over all (B, B*G) scores, or over each query's own group's (B, G)
    scores when the batch has no in-batch negatives; see the module docstring."""
    base = torch.arange(scores.size(0), device=scores.device)
    labels = base * group_size if scores.size(1) != group_size else base * 0
    mask = torch.zeros_like(scores)
    loss = scores.new_zeros(())
    for j in range(group_size):
        target = labels + j
        ce = F.cross_entropy(scores + mask, target, reduction="none")
        loss = loss + (teacher_targets[:, j] * ce).mean()
        mask = mask.scatter(1, target.unsqueeze(1), torch.finfo(scores.dtype).min)
    return loss


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float,
    teacher_scores: torch.Tensor | None = None,
    kd_loss_type: str = "kl_div",
    cross_device: bool = False,
    in_batch_negatives: bool = True,
) -> torch.Tensor:
    """The training loss for one batch (the maths: the module docstring).

    Args:
        q: (B, D) query embeddings.
        p: (B*G, D) passage embeddings, each query's group of G together, its positive first.
        temperature: scores are ``q @ p.T / temperature``.
        teacher_scores: (B, G) teacher scores of each query's group (knowledge distillation), or None.
        kd_loss_type: ``kl_div`` (added to InfoNCE) or ``m3_kd_loss`` (replaces it).
        cross_device: all-gather queries and passages from every worker first (in a process group).
        in_batch_negatives: False scores each query against its own group only (FlagEmbedding's
            ``no_in_batch_neg`` data sets: no in-batch, no cross-device negatives).

    Returns:
        The scalar loss: the mean over the (global, with ``cross_device``) batch of queries.

    Raises:
        ValueError: a temperature <= 0, an unknown ``kd_loss_type``, or passages that are not whole
            groups.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {kd_loss_type!r}")
    if q.size(0) == 0 or p.size(0) % q.size(0):
        raise ValueError(f"passages ({p.size(0)}) must be a whole number of groups per query ({q.size(0)})")
    group_size = p.size(0) // q.size(0)
    local_b = q.size(0)
    if not in_batch_negatives:
        return _own_group_loss(q, p, temperature, teacher_scores, kd_loss_type)
    if cross_device:
        q, p = gather_with_grad(q), gather_with_grad(p)
    scores = q @ p.T / temperature
    targets = torch.arange(q.size(0), device=q.device) * group_size
    if teacher_scores is None:
        hard = F.cross_entropy(scores, targets)
        return _global_grad(hard) if cross_device else hard
    teacher_targets = F.softmax(teacher_scores.detach().to(scores.dtype).view(local_b, group_size), dim=-1)
    if kd_loss_type == "m3_kd_loss":
        if cross_device:
            teacher_targets = gather_with_grad(teacher_targets)
        kd = m3_kd_loss(scores, teacher_targets, group_size)
        return _global_grad(kd) if cross_device else kd
    student = group_scores(scores, group_size)
    if cross_device and q.size(0) != local_b:
        rank = dist.get_rank()
        student = student[rank * local_b:(rank + 1) * local_b]
    hard = F.cross_entropy(scores, targets)
    return kl_div_loss(student, teacher_targets) + (_global_grad(hard) if cross_device else hard)


def _own_group_loss(q: torch.Tensor, p: torch.Tensor, temperature: float, teacher_scores: torch.Tensor | None,
                    kd_loss_type: str) -> torch.Tensor:
    """Each query against its own group only: (B, G) scores, the positive first."""
    b, g = q.size(0), p.size(0) // q.size(0)
    scores = torch.einsum("bd,bgd->bg", q, p.view(b, g, -1)) / temperature
    targets = torch.zeros(b, dtype=torch.long, device=q.device)
    if teacher_scores is None:
        return F.cross_entropy(scores, targets)
    teacher_targets = F.softmax(teacher_scores.detach().to(scores.dtype).view(b, g), dim=-1)
    if kd_loss_type == "m3_kd_loss":
        return m3_kd_loss(scores, teacher_targets, g)
    return kl_div_loss(scores, teacher_targets) + F.cross_entropy(scores, targets)


def matryoshka_loss(q: torch.Tensor, p: torch.Tensor, dims: list[int] | tuple[int, ...],
                    weights: list[float] | None = None, normalize: bool = True, **settings) -> torch.Tensor:
    """:func:`contrastive_loss` (with ``settings``) at each of ``dims``: the mean, or with ``weights`` the
    weighted sum.

    Raises:
        ValueError: no dims, a dim larger than the embeddings, or weights that do not match the dims.
    """
    if not dims or max(dims) > q.size(-1):
        raise ValueError(f"Matryoshka dims {list(dims)} must be non-empty and at most the embedding size {q.size(-1)}")
    if weights is not None and len(weights) != len(dims):
        raise ValueError(f"{len(weights)} weights for {len(dims)} Matryoshka dims")
    losses = []
    for d in dims:
        q_d, p_d = q[:, :d], p[:, :d]
        if normalize:
            q_d, p_d = F.normalize(q_d, dim=-1), F.normalize(p_d, dim=-1)
        losses.append(contrastive_loss(q_d, p_d, **settings))
    if weights is None:
        return torch.stack(losses).mean()
    return sum((w * loss for w, loss in zip(weights, losses, strict=True)), q.new_zeros(()))
