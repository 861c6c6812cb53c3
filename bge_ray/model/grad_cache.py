"""One micro-batch's forward and backward, whole or with gradient caching (``sub_batch_size``).

Contrastive loss couples every query with every passage of the batch (and, with
``negatives_cross_device``, of every worker's batch), so the batch cannot simply be split into
micro-batches: the loss of the parts is not the loss of the whole. GradCache (Gao et al., 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") computes the exact
full-batch gradient with the activations of only ``sub_batch_size`` sequences alive at a time:

1. encode queries and passages in chunks of ``sub_batch_size`` without autograd, keeping only the
   embeddings (and each chunk's RNG state, so dropout can be replayed);
2. compute the loss on those embeddings as leaf tensors and take its gradient with respect to
   them: ``dL/dq``, ``dL/dp`` (the all-gathers of cross-device negatives happen here, once);
3. encode each chunk again, now with autograd and the same dropout masks, and backpropagate
   ``sum(chunk_embeddings * dL/dchunk)``: by the chain rule the parameter gradients of all chunks
   add up to the gradient of the full-batch loss.

The cost is a second forward pass (about +1/3 compute, less the padding saved: each chunk is padded
to its own longest sequence); the memory for activations falls from the whole batch to one chunk.
To DeepSpeed each chunk's backward is one gradient-accumulation micro-step (``engine.backward``
then ``engine.step``): the engine is configured with ``gradient_accumulation_steps`` times
:func:`micro_steps` (``bge_ray.config.deepspeed.engine_config`` does it), so ZeRO 1-3 accumulate the chunks'
gradients as they do micro-batches, fp16 loss scaling included, and the optimizer steps once per
batch (several backward passes between two ``step`` calls are not accumulated correctly by ZeRO 1/2).

FlagEmbedding's ``sub_batch_size`` encodes in chunks but keeps every chunk's graph, so it saves
no activation memory; the loss and its gradient are the same as here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

Reps = torch.Tensor | tuple[torch.Tensor, ...]  # one side's embeddings: a tensor, or BGE-M3's (dense, sparse, ColBERT)
LossFn = Callable[[Reps, Reps], torch.Tensor]


class RngState:
    """The CPU (and, on a GPU, the device's) random state at one point, to replay dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the outer random streams continue as if it never ran."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _upcast(reps: Reps) -> Reps:
    """fp16/bf16 embeddings to fp32 for the loss; fp32 and fp64 as they are."""
    if isinstance(reps, tuple):
        return tuple(_upcast(t) for t in reps)
    return reps.float() if reps.dtype in (torch.float16, torch.bfloat16) else reps


def _parts(reps: Reps) -> tuple[torch.Tensor, ...]:
    return reps if isinstance(reps, tuple) else (reps,)


def _join(chunks: list[tuple[torch.Tensor, ...]], trimmed: list[int], width: int) -> list[torch.Tensor]:
    """Each part of the chunks' embeddings concatenated into a leaf tensor. Per-token parts (3-D: ColBERT
    vectors) are padded with zeros to the batch's ``width`` tokens, as if their chunk had not been trimmed
    (``trimmed``: each chunk's token width), so the loss sees the padded batch it would see without GradCache."""
    joined = []
    for parts in zip(*chunks, strict=True):
        if parts[0].dim() == 3:
            parts = tuple(F.pad(t, (0, 0, 0, width - w)) for t, w in zip(parts, trimmed, strict=True))
        joined.append(torch.cat(parts).detach().requires_grad_())
    return joined


def _cached_backward(emb: Reps, grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum(embedding * cached gradient)`` over a chunk's parts (per-token parts cut to the chunk's tokens)."""
    total = None
    for t, g in zip(_parts(_upcast(emb)), grads, strict=True):
        g = g[:, :t.size(1)] if t.dim() == 3 else g
        total = (t * g).sum() if total is None else total + (t * g).sum()
    return total


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim_right_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk padded to its own longest sequence, not the batch's (right padding only: cutting left
    padding would move the tokens' positions)."""
    longest = int(mask.sum(dim=1).max())
    if longest < mask.size(1) and not bool(mask[:, longest:].any()):
        return ids[:, :longest], mask[:, :longest]
    return ids, mask


def micro_steps(batch_size: int, group_size: int, sub_batch_size: int | None) -> int:
    """DeepSpeed micro-steps per micro-batch: 1 without GradCache, else one per chunk of queries or passages."""
    if not sub_batch_size or sub_batch_size <= 0 or batch_size * max(1, group_size) <= sub_batch_size:
        return 1
    return len(_chunks(batch_size, sub_batch_size)) + len(_chunks(batch_size * group_size, sub_batch_size))


def train_micro_batch(engine: Any, inputs: dict[str, torch.Tensor], loss_fn: LossFn,
                      sub_batch_size: int | None = None) -> torch.Tensor:
    """Forward, backward and ``engine.step()`` of one micro-batch.

    With ``sub_batch_size`` below the batch's passages the gradient is computed by GradCache (the
    module docstring) and equals the full-batch one.

    Args:
        engine: a DeepSpeed engine (or anything with ``__call__(q_ids, q_mask, p_ids, p_mask) -> (q, p)``,
            ``backward(loss)`` that divides by ``gradient_accumulation_steps()``, and ``step()``); with
            GradCache it must count :func:`micro_steps` per batch.
        inputs: ``q_input_ids``, ``q_attention_mask``, ``p_input_ids``, ``p_attention_mask`` tensors.
        loss_fn: ``(q, p) -> loss``, e.g. :func:`bge_ray.model.loss.contrastive_loss` with its settings bound.
        sub_batch_size: GradCache's chunk size; None or <= 0 for the plain forward and backward.

    Returns:
        The batch's loss, detached.

    Raises:
        ValueError: with GradCache, an engine whose ``gradient_accumulation_steps`` is not a multiple
            of the micro-steps one batch takes.
    """
    q_ids, q_mask = inputs["q_input_ids"], inputs["q_attention_mask"]
    p_ids, p_mask = inputs["p_input_ids"], inputs["p_attention_mask"]
    batch, group = q_ids.size(0), p_ids.size(0) // max(1, q_ids.size(0))
    steps = micro_steps(batch, group, sub_batch_size)
    if steps == 1:
        q, p = engine(q_ids, q_mask, p_ids, p_mask)
        loss = loss_fn(_upcast(q), _upcast(p))
        engine.backward(loss)
        engine.step()
        return loss.detach()
    if engine.gradient_accumulation_steps() % steps:
        raise ValueError(f"GradCache with sub_batch_size {sub_batch_size} takes {steps} micro-steps per batch; the "
                         f"engine's gradient_accumulation_steps ({engine.gradient_accumulation_steps()}) must be a "
                         "multiple (bge_ray.config.deepspeed.engine_config sets it)")
    return _grad_cache(engine, (q_ids, q_mask), (p_ids, p_mask), loss_fn, sub_batch_size, steps)


def _grad_cache(engine: Any, queries: tuple[torch.Tensor, torch.Tensor], passages: tuple[torch.Tensor, torch.Tensor],
                loss_fn: LossFn, sub_batch_size: int, steps: int) -> torch.Tensor:
    """The three GradCache passes of the module docstring over chunks of ``sub_batch_size`` texts."""
    inputs = {"q": queries, "p": passages}

    def encode(side: str, rows: slice) -> tuple[Reps, int]:
        ids, mask = trim_right_padding(inputs[side][0][rows], inputs[side][1][rows])
        out = engine(ids, mask, None, None)[0] if side == "q" else engine(None, None, ids, mask)[1]
        return out, ids.size(1)

    pieces = [(side, rows) for side in ("q", "p") for rows in _chunks(inputs[side][0].size(0), sub_batch_size)]
    # 1. embeddings without autograd, each chunk's random state kept
    states: list[RngState] = []
    widths: dict[str, list[int]] = {"q": [], "p": []}
    reps: dict[str, list[tuple[torch.Tensor, ...]]] = {"q": [], "p": []}
    with torch.no_grad():
        for side, rows in pieces:
            states.append(RngState(queries[0].device))
            out, width = encode(side, rows)
            multi = isinstance(out, tuple)
            reps[side].append(_parts(_upcast(out)))
            widths[side].append(width)
    # 2. the loss on the cached embeddings, and its gradient with respect to them
    leaves = {side: _join(reps[side], widths[side], inputs[side][0].size(1)) for side in ("q", "p")}
    q, p = (tuple(leaves["q"]), tuple(leaves["p"])) if multi else (leaves["q"][0], leaves["p"][0])
    loss = loss_fn(q, p)
    flat = leaves["q"] + leaves["p"]
    found = torch.autograd.grad(loss, flat, allow_unused=True)
    found = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, found, strict=True)]
    grads = {"q": found[:len(leaves["q"])], "p": found[len(leaves["q"]):]}
    # 3. each chunk again, with autograd and the same dropout, backpropagating its cached gradient; the
    #    engine divides each by its micro-steps per optimizer step, the sum over chunks is multiplied back
    for (side, rows), state in zip(pieces, states, strict=True):
        with state.replay():
            emb, _ = encode(side, rows)
        engine.backward(_cached_backward(emb, [g[rows] for g in grads[side]]) * steps)
        engine.step()
    return loss.detach()
