"""Every random stream bge-ray draws from, derived in one place from the run's ``seed``.

Each stream depends only on what names it (the seed, the epoch, a row's key, a file, a rank), never
on which process draws it or in which order, so a draw is the same on every worker and every rerun.
"""

from __future__ import annotations

import random


def row_group_rng(seed: int, epoch: int, row_key: int) -> random.Random:
    """The draw of a row's positive and negatives in an epoch."""
    return random.Random((seed * 1_000_003 + epoch) * 4_294_967_296 + row_key)


def file_shuffle_rng(seed: int, epoch: int, path: str) -> random.Random:
    """The order a file's rows leave its shuffle buffer in an epoch."""
    return random.Random(f"{seed}:{epoch}:{path}")


def plan_rng(seed: int, epoch: int) -> random.Random:
    """An epoch's plan: the order of the data's chunks (and, with same_dataset_within_batch, of the batches)."""
    return random.Random(f"plan:{seed}:{epoch}")


def window_rng(seed: int, epoch: int, window: int) -> random.Random:
    """The order of the rows of one window of an epoch's stream."""
    return random.Random(f"window:{seed}:{epoch}:{window}")


def file_sample_rng(seed: int, path: str) -> random.Random:
    """The rows kept from a file capped by ``max_example_num_per_dataset`` (the same every epoch)."""
    return random.Random(f"{seed}:{path}")


def batch_order_seed(seed: int, epoch: int, rank: int) -> int:
    """A worker's order of length-grouped batches in an epoch."""
    return seed * 7919 + epoch * 104729 + rank


def negatives_rng(seed: int, row_key: int) -> random.Random:
    """``bge-ray mine``: which of a row's candidates become its negatives."""
    return random.Random(f"{seed}:{row_key}")


def init_seed(seed: int, rank: int) -> int:
    """Torch's seed on a training worker (dropout; the same model on every rank)."""
    return seed + rank
