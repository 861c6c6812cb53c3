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
    teacher_targets = None if teacher_scores is None else teacher_distribution(teacher_scores, local_b, q.dtype)
    if not in_batch_negatives:
        return scores_loss(own_group_scores(q, p) / temperature, group_size, teacher_targets, kd_loss_type)
    if not cross_device:
        return scores_loss(q @ p.T / temperature, group_size, teacher_targets, kd_loss_type)
    q, p = gather_with_grad(q), gather_with_grad(p)
    scores = q @ p.T / temperature
    targets = torch.arange(q.size(0), device=q.device) * group_size
    if teacher_targets is None:
        return _global_grad(F.cross_entropy(scores, targets))
    if kd_loss_type == "m3_kd_loss":
        return _global_grad(m3_kd_loss(scores, gather_with_grad(teacher_targets), group_size))
    student = group_scores(scores, group_size)
    if q.size(0) != local_b:
        rank = dist.get_rank()
        student = student[rank * local_b:(rank + 1) * local_b]
    return kl_div_loss(student, teacher_targets) + _global_grad(F.cross_entropy(scores, targets))


def teacher_distribution(teacher_scores: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, G) softmax of the teacher's scores of each query's group (no gradient)."""
    return F.softmax(teacher_scores.detach().to(dtype).view(batch, -1), dim=-1)


def own_group_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B, G) scores of each query against its own group only."""
    b = q.size(0)
    return torch.einsum("bd,bgd->bg", q, p.view(b, p.size(0) // b, -1))


def scores_loss(scores: torch.Tensor, group_size: int, teacher_targets: torch.Tensor | None = None,
                kd_loss_type: str = "kl_div") -> torch.Tensor:
    """The loss of one process's scores: (B, B*G) in-batch, or (B, G) of each query's own group (the
    positive first in both). ``teacher_targets``: (B, G) teacher distribution, or None."""
    own = scores.size(1) == group_size
    targets = torch.arange(scores.size(0), device=scores.device) * (0 if own else group_size)
    if teacher_targets is None:
        return F.cross_entropy(scores, targets)
    if kd_loss_type == "m3_kd_loss":
        return m3_kd_loss(scores, teacher_targets, group_size)
    student = scores if own else group_scores(scores, group_size)
    return kl_div_loss(student, teacher_targets) + F.cross_entropy(scores, targets)


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


def colbert_scores(q: torch.Tensor, p: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
    """(Q, P) ColBERT scores of (Q, Lq, C) query and (P, Lp, C) passage token vectors: each query token's best
    match among the passage's tokens, summed over the query's and divided by ``q_mask[:, 1:]``'s count (its
    tokens after the first, as the vectors are). Padding vectors are zero, so they score 0, as in
    FlagEmbedding's training."""
    best = torch.einsum("qin,pjn->qipj", q, p).max(dim=-1).values
    return best.sum(dim=1) / q_mask[:, 1:].sum(dim=-1, keepdim=True).to(best.dtype)


def m3_loss(q: tuple[torch.Tensor, ...], p: tuple[torch.Tensor, ...], q_mask: torch.Tensor, temperature: float,
            teacher_scores: torch.Tensor | None = None, kd_loss_type: str = "kl_div", cross_device: bool = False,
            in_batch_negatives: bool = True, self_distill: bool = False,
            score_weights: tuple[float, float, float] = (1.0, 0.3, 1.0),
            loss_weights: tuple[float, float, float] = (1.0, 0.1, 1.0)) -> torch.Tensor:
    """BGE-M3's unified loss (FlagEmbedding's ``EncoderOnlyEmbedderM3Model`` with ``unified_finetuning``).

    ``q`` and ``p`` are (dense, sparse, ColBERT) representations (:data:`bge_ray.model.m3.M3Reps`). The
    dense loss is :func:`contrastive_loss` (cross-device negatives where asked); the sparse, ColBERT and
    ensemble (``score_weights`` · (dense, sparse, ColBERT) scores) losses use this worker's batch only, as
    FlagEmbedding's do. With ``loss_weights`` (w_d, w_s, w_c)::

        loss = (w_d * dense + ensemble + w_s * sparse + w_c * colbert) / 4
        self_distill: loss = (loss + (w_d * kl(dense) + w_s * kl(sparse) + w_c * kl(colbert)) / 3) / 2

    where ``kl(x)`` is the soft cross-entropy of x's scores against softmax(ensemble scores), detached.
    FlagEmbedding's values are the defaults. Without in-batch negatives each query's own group is scored
    (FlagEmbedding 1.4.2 indexes its ensemble scores wrongly there; this is the loss it means).
    """
    (q_dense, q_sparse, q_colbert), (p_dense, p_sparse, p_colbert) = q, p
    dense_loss = contrastive_loss(q_dense, p_dense, temperature, teacher_scores, kd_loss_type, cross_device,
                                  in_batch_negatives)
    group_size = p_dense.size(0) // q_dense.size(0)
    scores = [q_dense @ p_dense.T, q_sparse @ p_sparse.T, colbert_scores(q_colbert, p_colbert, q_mask)]
    scores = [s / temperature if in_batch_negatives else group_scores(s, group_size) / temperature for s in scores]
    ensemble = sum((w * s for w, s in zip(score_weights, scores, strict=True)), scores[0].new_zeros(()))
    teacher = None if teacher_scores is None else teacher_distribution(teacher_scores, q_dense.size(0), scores[0].dtype)
    sparse_loss, colbert_loss, ensemble_loss = (scores_loss(s, group_size, teacher, kd_loss_type)
                                                for s in (scores[1], scores[2], ensemble))
    w_dense, w_sparse, w_colbert = loss_weights
    loss = (w_dense * dense_loss + ensemble_loss + w_sparse * sparse_loss + w_colbert * colbert_loss) / 4
    if not self_distill:
        return loss
    targets = F.softmax(ensemble.detach(), dim=-1)
    distilled = [kl_div_loss(s, targets) for s in scores]
    return (loss + (w_dense * distilled[0] + w_sparse * distilled[1] + w_colbert * distilled[2]) / 3) / 2
