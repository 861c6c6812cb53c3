"""Every random stream bge-ray draws from, derived in one place from the run's ``seed``.

Each stream depends only on what names it (the seed, the epoch, a row's key, a file, a rank), never
on which process draws it or in which order, so a draw is the same on every worker and every rerun.
"""

from __future__ import annotations

import random

import numpy as np


def row_group_rng(seed: int, epoch: int, row_key: int) -> random.Random:
    """The draw of a row's positive and negatives in an epoch."""
    return random.Random((seed * 1_000_003 + epoch) * 4_294_967_296 + row_key)


def plan_generator(seed: int, epoch: int) -> np.random.Generator:
    """An epoch's plan: the order of the data's chunks (and, with same_dataset_within_batch, of the batches)."""
    return np.random.default_rng([seed, epoch, 0x706C616E])


def window_rng(seed: int, epoch: int, dataset: int, window: int) -> random.Random:
    """The order of the rows of one window of a data set's stream in an epoch."""
    return random.Random(f"window:{seed}:{epoch}:{dataset}:{window}")


def text_shuffle_rng(seed: int, epoch: int, row_key: int) -> random.Random:
    """``shuffle_ratio``: whether, and how, a row's positive is cut and reordered in an epoch."""
    return random.Random(f"text:{seed}:{epoch}:{row_key}")


def file_sample_rng(seed: int, path: str) -> random.Random:
    """The rows kept from a file capped by ``max_example_num_per_dataset`` (the same every epoch)."""
    return random.Random(f"{seed}:{path}")


def length_pool_rng(seed: int, epoch: int, rank: int, pool: int) -> random.Random:
    """``group_by_length``: the order of the regrouped batches of one pool of a worker's epoch."""
    return random.Random(f"length:{seed}:{epoch}:{rank}:{pool}")


def negatives_rng(seed: int, row_key: int) -> random.Random:
    """``bge-ray mine``: which of a row's candidates become its negatives."""
    return random.Random(f"{seed}:{row_key}")


def init_seed(seed: int, rank: int) -> int:
    """Torch's seed on a training worker (dropout; the same model on every rank)."""
    return seed + rank


def icl_rng(seed: int, row_keys: list[int]) -> random.Random:
    """``icl``: how many in-context examples each query of a worker's batch gets, and which (the batch is
    named by its rows)."""
    return random.Random(f"icl:{seed}:{','.join(map(str, row_keys))}")
