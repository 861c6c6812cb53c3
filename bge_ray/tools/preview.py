"""``bge-ray preview``: the exact rows every worker would train in the first batches of an epoch,
without training. The same scan, plan, Ray Data pipeline and router a fine-tune runs, with the rows'
texts in place of tokens; and how well the batches mix the files, beside random permutations of the
same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from bge_ray.cluster import connect_for
from bge_ray.config.finetune import FinetuneConfig
from bge_ray.config.parse import resolve_config
from bge_ray.console import log
from bge_ray.data.pipeline import router_batches, start_router
from bge_ray.data.scan import TrainingData, load_training_data

REFERENCE_PERMUTATIONS = 200


@dataclass
class Mixing:
    """How a preview's batches mix the files, beside random permutations of the same rows."""

    pairs: int                   # pairs of rows that shared a global batch
    same_file: float             # the share of them from the same file
    same_file_random: float      # the same share over random permutations of all rows: mean
    same_file_sd: float          # and standard deviation
    rank_correlation: float      # Spearman's, between a row's place in the epoch and its place on disk
    rank_correlation_sd: float   # its standard deviation over random permutations (the mean is 0)

    def describe(self) -> str:
        return (f"{self.pairs:,} pairs of rows shared a batch, {self.same_file:.4f} of them from the same file "
                f"(random permutations: {self.same_file_random:.4f} +- {self.same_file_sd:.4f}); Spearman's rho "
                f"between a row's place in the epoch and on disk {self.rank_correlation:+.4f} (random: 0 +- "
                f"{self.rank_correlation_sd:.4f})")


def _same_pairs(labels: np.ndarray, sizes: list[int]) -> tuple[int, int]:
    same = pairs = 0
    at = 0
    for size in sizes:
        counts = np.bincount(labels[at:at + size])
        same += int((counts * (counts - 1) // 2).sum())
        pairs += size * (size - 1) // 2
        at += size
    return same, pairs


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return 0.0
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def mixing(batch_rows: list[list[tuple[int, int]]], file_rows: list[int], seed: int = 0) -> Mixing:
    """``batch_rows``: each global batch's rows as (file, line), in training order; ``file_rows``:
    every file's usable rows. The reference: the same batch sizes cut from random permutations of
    all rows."""
    sizes = [len(b) for b in batch_rows]
    labels = np.asarray([f for b in batch_rows for f, _ in b], dtype=np.int64)
    lines = np.asarray([line for b in batch_rows for _, line in b], dtype=np.int64)
    disk = labels * (int(lines.max(initial=0)) + 1) + lines  # place on disk: the file's, then the line's
    same, pairs = _same_pairs(labels, sizes)
    rng = np.random.default_rng(seed)
    everyone = np.repeat(np.arange(len(file_rows)), file_rows)
    ref_same, ref_rho = [], []
    for _ in range(REFERENCE_PERMUTATIONS):
        perm = rng.permutation(len(everyone))[:len(labels)]
        ref_same.append(_same_pairs(everyone[perm], sizes)[0] / max(1, pairs))
        ref_rho.append(_spearman(np.arange(len(perm)), perm))
    return Mixing(pairs, same / max(1, pairs), float(np.mean(ref_same)), float(np.std(ref_same)),
                  _spearman(np.arange(len(disk)), disk), float(np.std(ref_rho)))


def _row(part: dict[str, Any], i: int) -> dict[str, Any]:
    return {"source": str(part["source"][i]), "query": str(part["query"][i]), "pos": list(part["pos"][i]),
            "neg": list(part["neg"][i])}


def preview(cfg: FinetuneConfig, steps: int, epoch: int, out_path: str) -> tuple[int, Mixing | None, TrainingData]:
    """Write the first ``steps`` optimizer steps of ``epoch`` to ``out_path`` (JSON Lines, one line per
    worker per micro-batch: step, batch, worker, data set and rows with their ``path:line`` and texts,
    the group drawn for the epoch). Returns the batches written, their mixing (None with
    same_dataset_within_batch, whose batches are one file each by design) and the data."""
    connect_for(1, {"CPU": 1}, cfg.ray_address)
    data = load_training_data(cfg)
    world = cfg.num_workers
    router = start_router(cfg, data, tokenize=False)
    index = {f.path: i for i, f in enumerate(data.files)}
    try:
        left = ray.get(router.begin.remote(epoch, 0))
        streams = [router_batches(router, rank) for rank in range(world)]
        wanted = min(left, steps * cfg.gradient_accumulation_steps)
        batch_rows: list[list[tuple[int, int]]] = []
        with open(out_path, "w", encoding="utf-8") as out:
            for batch in range(wanted):
                rows_here = []
                for rank, stream in enumerate(streams):
                    d, part = next(stream)
                    rows = [_row(part, i) for i in range(len(part["row_key"]))]
                    out.write(json.dumps({"epoch": epoch, "step": batch // cfg.gradient_accumulation_steps,
                                          "batch": batch, "worker": rank, "dataset": data.datasets[d].name,
                                          "rows": rows}, ensure_ascii=False) + "\n")
                    for row in rows:
                        path, _, line = row["source"].rpartition(":")
                        rows_here.append((index[path], int(line)))
                batch_rows.append(rows_here)
    finally:
        ray.kill(router)
    same_dataset = cfg.same_dataset_within_batch
    file_rows = [f.kept for f in data.files]
    return len(batch_rows), None if same_dataset else mixing(batch_rows, file_rows, cfg.seed), data


def run_preview(values: dict[str, Any], steps: int, epoch: int, out_path: str) -> None:
    """``bge-ray preview``: the train config's data settings; ``output_dir`` is not written."""
    values = {"output_dir": "preview (not written)", **values, "overwrite_output_dir": True}
    cfg = resolve_config(values)
    n, mix, data = preview(cfg, steps, epoch, out_path)
    log(f"training data: {data.describe()}")
    log(f"wrote {n} global batch(es) x {cfg.num_workers} worker(s) of epoch {epoch} to {out_path}")
    if mix is not None:
        log(f"mixing: {mix.describe()}")
    else:
        log("same_dataset_within_batch: every batch is from one data set (see each line's dataset)")
