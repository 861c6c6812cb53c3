"""Batches for the model: padding, length-grouped batches, and a group collator."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from bge_ray.seeds import length_pool_rng


def pad_ids(seqs: list[list[int]], pad_id: int, side: str = "right", multiple_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id lists to the longest (rounded up to ``multiple_of``); return ids and mask."""
    longest = max(len(s) for s in seqs)
    if multiple_of:
        longest = int(math.ceil(longest / multiple_of) * multiple_of)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, longest - len(s):] = s
            mask[i, longest - len(s):] = 1
        else:
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
    return ids, mask


LENGTH_POOL_BATCHES = 16  # group_by_length sorts this many consecutive batches' rows at a time


def row_length(pos_ids: Any, neg_ids: Any) -> int:
    """The padded length a row asks of its batch: its longest passage (passages dominate the compute)."""
    return max((len(t) for texts in (pos_ids, neg_ids) if texts is not None for t in texts), default=0)


def length_grouped(batches: Iterator[dict[str, Any]], batch_size: int, seed: int, epoch: int, rank: int,
                   first_pool: int = 0, pool: int = LENGTH_POOL_BATCHES) -> Iterator[dict[str, Any]]:
    """``group_by_length``: regroup the rows of every ``pool`` consecutive batches so that each batch
    holds rows of similar length (padding less), then yield those batches in a random order seeded by
    the pool (``first_pool`` is the number of the first pool ``batches`` starts: a resumed epoch).

    The rows still arrive shuffled (the pool is ``pool`` x ``batch_size`` rows of the shuffled stream),
    so a batch's in-batch negatives are random rows of similar length. The same rows are trained, in
    the same number of batches: only which rows share a batch changes."""
    for number in itertools.count(first_pool):
        taken = list(itertools.islice(batches, pool))
        if not taken:
            return
        rng = length_pool_rng(seed, epoch, rank, number)
        merged = {k: np.concatenate([b[k] for b in taken]) for k in taken[0]}
        lengths = [row_length(p, n) for p, n in zip(merged["pos_ids"], merged["neg_ids"], strict=True)]
        order = np.argsort(np.asarray(lengths), kind="stable")
        groups = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        rng.shuffle(groups)
        for rows in groups:
            yield {k: v[rows] for k, v in merged.items()}


@dataclass
class GroupCollator:
    """Turns a batch of sampled, tokenized rows (1 positive + ``group_size-1`` negatives each, see
    :func:`sample_row`) into padded model inputs: the queries, then each row's group, positive first.
    ``group_size`` None: the batch's own (its rows all hold as many negatives)."""

    group_size: int | None
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    knowledge_distillation: bool = False

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        queries, passages, teacher = [], [], []
        group_size = self.group_size or 1 + len(batch["neg_ids"][0])
        for i in range(len(batch["row_key"])):
            pos, neg = batch["pos_ids"][i], batch["neg_ids"][i]
            if len(pos) != 1 or len(neg) != group_size - 1:
                raise ValueError(f"row {int(batch['row_key'][i])} holds {len(pos)} positive(s) and {len(neg)} "
                                 f"negative(s), not a sampled group of {group_size} (see sample_row)")
            queries.append(list(batch["q_ids"][i]))
            passages.append(list(pos[0]))
            passages.extend(list(t) for t in neg)
            if self.knowledge_distillation:
                teacher.append([float(batch["pos_scores"][i][0])] + [float(x) for x in batch["neg_scores"][i]])
        q_ids, q_mask = pad_ids(queries, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        p_ids, p_mask = pad_ids(passages, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        out: dict[str, Any] = {"q_input_ids": q_ids, "q_attention_mask": q_mask,
                               "p_input_ids": p_ids, "p_attention_mask": p_mask}
        if self.knowledge_distillation:
            out["teacher_scores"] = np.asarray(teacher, dtype=np.float32)
        return out


@dataclass
class PairCollator:
    """A reranker's batch (rows tokenized by :func:`bge_ray.data.pairs.tokenize_pairs`) as padded model
    inputs: each row's group of (query, passage) sequences, positive first."""

    group_size: int
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    knowledge_distillation: bool = False

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids, types, teacher = [], [], []
        with_types = "pos_types" in batch
        for i in range(len(batch["row_key"])):
            pos, neg = batch["pos_ids"][i], batch["neg_ids"][i]
            if len(pos) != 1 or len(neg) != self.group_size - 1:
                raise ValueError(f"row {int(batch['row_key'][i])} holds {len(pos)} positive(s) and {len(neg)} "
                                 f"negative(s), not a sampled group of {self.group_size} (see sample_row)")
            ids += [list(pos[0]), *(list(t) for t in neg)]
            if with_types:
                types += [list(batch["pos_types"][i][0]), *(list(t) for t in batch["neg_types"][i])]
            if self.knowledge_distillation:
                teacher.append([float(batch["pos_scores"][i][0])] + [float(x) for x in batch["neg_scores"][i]])
        input_ids, mask = pad_ids(ids, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if with_types:
            out["token_type_ids"] = pad_ids(types, 0, self.padding_side, self.pad_to_multiple_of)[0]
        if self.knowledge_distillation:
            out["teacher_scores"] = np.asarray(teacher, dtype=np.float32)
        return out
