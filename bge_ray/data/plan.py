"""Which rows every worker trains in an epoch, in which order: decided before any row is read, from
the index the scan pass builds, by arithmetic seeded with (``seed``, epoch). The same on every
process and every run, whatever Ray's scheduling does.

The index knows, for each file, its usable rows and where every ``chunk_rows``-th of them starts
(line and byte offset), so any chunk can be read on its own. An epoch is:

* without ``same_dataset_within_batch`` (FlagEmbedding's random sampler over all files): the chunks
  of all files in a random order; their rows one stream, cut into windows of ``window_rows`` rows,
  each window's rows put in a random order when it is read. Global batches of
  ``per_device_train_batch_size`` x workers rows follow one another in that stream (an incomplete
  last one is dropped); worker ``r`` trains slice ``r`` of each. A row's place in the epoch does not
  depend on its place on disk, and two rows of a batch come from the same chunk with probability
  about ``chunk_rows`` / ``window_rows``: a global permutation's statistics.
* with it (FlagEmbedding's same-dataset sampler): the same within each data set (a file, or the
  small files of a folder merged), each data set's stream cut into global batches of its own batch
  size x workers rows; the global batches of all data sets in a random order.

Windows are read in the order the batches first need their rows. Everything here is numpy arrays,
so the plan of a billion-row epoch is a few hundred MB at most (see :func:`chunk_rows_for`).
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field

import numpy as np

from bge_ray.seeds import plan_generator

MIN_CHUNK_ROWS = 4
MAX_CHUNKS = 1 << 22  # chunk starts kept in the index: 4M x 16 bytes
MIN_WINDOW_CHUNKS = 32  # a window mixes at least this many chunks, however large chunks get


def chunk_rows_for(estimated_rows: int) -> int:
    """Rows per chunk: 4 (a window of 1,000 rows then mixes 250 places of the data), more once the
    data holds more than 16M rows, so that the index stays under :data:`MAX_CHUNKS` chunks."""
    return max(MIN_CHUNK_ROWS, math.ceil(estimated_rows / MAX_CHUNKS))


def window_rows_for(shuffle_buffer_size: int, chunk_rows: int) -> int:
    """Rows shuffled together: ``shuffle_buffer_size``, but at least :data:`MIN_WINDOW_CHUNKS` chunks."""
    return max(shuffle_buffer_size, MIN_WINDOW_CHUNKS * chunk_rows)


@dataclass(frozen=True, eq=False)
class FileIndex:
    """One training file as the scan pass found it."""

    path: str                           # as given: rows are named by it (path:line)
    read_path: str                      # where chunks are read from: the path, or a compressed file's plain copy
    rows: int                           # usable rows in the file
    chunk_lines: np.ndarray             # int64: the 1-based line of the first row of each chunk
    chunk_offsets: np.ndarray           # int64: that line's byte offset in read_path
    chunk_rows: int                     # usable rows per chunk (the last chunk may have fewer)
    keep: np.ndarray | None = None      # sorted ordinals of the rows kept under max_example_num_per_dataset
    first_row: dict = field(default_factory=dict)  # the first usable row's batch_size / type / train_group_size / neg count
    has_scores: bool = False            # every usable row carries pos_scores and neg_scores
    types: tuple[str, ...] = ()         # the rows' task types ("" for none)

    @property
    def kept(self) -> int:
        return self.rows if self.keep is None else len(self.keep)

    def kept_per_chunk(self) -> np.ndarray:
        """How many kept rows each chunk holds."""
        n = len(self.chunk_lines)
        if self.keep is None:
            counts = np.full(n, self.chunk_rows, dtype=np.int64)
            if n:
                counts[-1] = self.rows - (n - 1) * self.chunk_rows
            return counts
        bounds = np.searchsorted(self.keep, np.arange(n + 1, dtype=np.int64) * self.chunk_rows)
        return np.diff(bounds)

    def kept_in_chunk(self, chunk: int) -> np.ndarray | None:
        """The kept ordinals of chunk ``chunk`` (None: all of its rows)."""
        if self.keep is None:
            return None
        low = chunk * self.chunk_rows
        return self.keep[np.searchsorted(self.keep, low):np.searchsorted(self.keep, low + self.chunk_rows)]


@dataclass(frozen=True)
class DataSet:
    """Rows that may share a batch under same_dataset_within_batch (all files otherwise), and what
    FlagEmbedding reads from them: batch size, group size, task type, in-batch negatives, scores."""

    name: str
    files: tuple[int, ...]
    batch_size: int
    group_size: int
    kind: str | None = None
    in_batch_negatives: bool = True
    has_scores: bool = True

    @property
    def symmetric(self) -> bool:
        """Passages are texts like the queries (sts, clustering): they get the query's instruction."""
        return self.kind in ("symmetric_sts", "symmetric_clustering")


def no_in_batch_neg(name: str) -> bool:
    """FlagEmbedding's rule: a file (``x-no_in_batch_neg.jsonl``) or folder named ``...no_in_batch_neg``
    trains without in-batch negatives."""
    stem = posixpath.basename(name.rstrip("/"))
    for ext in (".gz", ".jsonl", ".json"):
        stem = stem[:-len(ext)] if stem.endswith(ext) else stem
    return stem.endswith("no_in_batch_neg")


def file_group_size(first: dict, default: int) -> int:
    """FlagEmbedding's group size for a file's batches, from its first row: 2 for ``only_1neg``,
    ``default`` for other types (``symmetric_class`` at most: each worker's batch then takes its first
    row's negatives + 1, see :func:`bge_ray.data.pipeline.class_group`); a row without a type may set
    its own ``train_group_size``."""
    kind = first.get("type")
    if kind == "only_1neg":
        return 2
    if kind is not None:
        return default
    size = first.get("train_group_size")
    return size if isinstance(size, int) and size > 0 else default


def file_batch_size(first: dict, default: int) -> int:
    """FlagEmbedding's per-file batch size: the rows' ``batch_size``, half the default for symmetric types."""
    size = first.get("batch_size")
    if isinstance(size, int) and size > 0:
        return size
    return max(1, default // 2) if "symmetric" in str(first.get("type") or "") else default


def group_datasets(files: list[FileIndex], folders: dict[int, str], batch_size: int, group_size: int,
                   same_dataset: bool, small_threshold: int = 0, drop_threshold: int = 0
                   ) -> tuple[list[DataSet], list[str]]:
    """The data sets of a run and the files left out (each with why). ``folders``: file -> the
    train_data folder it was listed from (files named directly are not in it).

    Without same_dataset_within_batch all files are one data set. With it (FlagEmbedding's rules), each
    file is one, except that files of a folder with fewer than ``small_threshold`` rows are merged into
    one data set (the smallest of their batch sizes), left out when it has fewer than
    ``drop_threshold`` rows; a file named directly with fewer than ``small_threshold`` rows is left out."""
    if not same_dataset:
        return [DataSet("all files", tuple(range(len(files))), batch_size, group_size,
                        has_scores=all(f.has_scores for f in files if f.kept))], []
    sets: list[DataSet] = []
    dropped: list[str] = []
    small: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        if f.kept == 0:
            continue
        if f.kept < small_threshold:
            if i in folders:
                small.setdefault(folders[i], []).append(i)
            else:
                dropped.append(f"{f.path} ({f.kept} rows < small_threshold {small_threshold})")
            continue
        sets.append(_dataset(f.path, (i,), files, folders.get(i, f.path), batch_size, group_size))
    for folder, members in small.items():
        rows = sum(files[i].kept for i in members)
        if rows < drop_threshold:
            dropped.append(f"the small files of {folder} ({rows} rows < drop_threshold {drop_threshold})")
            continue
        merged = _dataset(f"{folder} (small files)", tuple(members), files, folder, batch_size, group_size)
        sets.append(DataSet(merged.name, merged.files, min(file_batch_size(files[i].first_row, batch_size)
                                                           for i in members),
                            merged.group_size, merged.kind, merged.in_batch_negatives, merged.has_scores))
    return sets, dropped


def _dataset(name: str, members: tuple[int, ...], files: list[FileIndex], flag_name: str, batch_size: int,
             group_size: int) -> DataSet:
    first = files[members[0]].first_row
    return DataSet(name, members, file_batch_size(first, batch_size), file_group_size(first, group_size),
                   first.get("type"), not no_in_batch_neg(flag_name), all(files[i].has_scores for i in members))


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """The chunks of one data set that hold kept rows, in stream order: their file, chunk number and
    kept rows, and the stream's row count after each."""

    file: np.ndarray   # int32
    chunk: np.ndarray  # int64
    rows: np.ndarray   # int64
    ends: np.ndarray   # int64, the cumulative sum of rows

    @classmethod
    def of(cls, files: list[FileIndex], members: tuple[int, ...]) -> ChunkTable:
        counts = [files[f].kept_per_chunk() for f in members]
        file = np.concatenate([np.full(len(c), f, dtype=np.int32) for f, c in zip(members, counts, strict=True)]
                              + [np.empty(0, np.int32)])
        chunk = np.concatenate([np.arange(len(c), dtype=np.int64) for c in counts] + [np.empty(0, np.int64)])
        rows = np.concatenate([*counts, np.empty(0, np.int64)]).astype(np.int64)
        keep = rows > 0
        return cls(file[keep], chunk[keep], rows[keep], np.cumsum(rows[keep]))

    def permuted(self, order: np.ndarray) -> ChunkTable:
        rows = self.rows[order]
        return ChunkTable(self.file[order], self.chunk[order], rows, np.cumsum(rows))

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0


@dataclass(frozen=True)
class Segment:
    """Kept rows ``skip`` .. ``skip + take`` of one chunk of one file."""

    file: int
    chunk: int
    skip: int
    take: int


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """An epoch's data: each data set's chunk stream, its windows in reading order and its global
    batches in training order, from the ``done``-th on (a resumed epoch)."""

    epoch: int
    world: int
    window_rows: int
    streams: list[ChunkTable]       # per data set, its chunks in this epoch's order
    batch_dataset: np.ndarray       # per global batch, its data set
    per_rank: np.ndarray            # per data set, rows each worker gets of one of its batches
    window_dataset: np.ndarray      # per window, in reading order: its data set
    window_number: np.ndarray       # and its number within its data set's stream
    done: int = 0

    @property
    def batches(self) -> int:
        """Global batches left in the epoch."""
        return len(self.batch_dataset) - self.done

    def consumed(self, batches: int) -> np.ndarray:
        """Rows of each data set the first ``batches`` global batches take."""
        counts = np.bincount(self.batch_dataset[:batches], minlength=len(self.streams))
        return counts * self.per_rank * self.world

    def windows(self) -> list[tuple[int, int, int]]:
        """(data set, window number, rows trained before) of each window still to read, in order."""
        before = self.consumed(self.done)
        out = []
        for d, k in zip(self.window_dataset.tolist(), self.window_number.tolist(), strict=True):
            trained = max(0, int(before[d]) - k * self.window_rows)
            if trained < self.window_size(d, k):
                out.append((d, k, trained))
        return out

    def window_size(self, dataset: int, number: int) -> int:
        return max(0, min(self.window_rows, self.streams[dataset].total - number * self.window_rows))

    def segments(self, dataset: int, number: int) -> list[Segment]:
        """The chunk pieces window ``number`` of ``dataset``'s stream is made of."""
        s = self.streams[dataset]
        ends = s.ends
        low, high = number * self.window_rows, min((number + 1) * self.window_rows, s.total)
        out = []
        i = int(np.searchsorted(ends, low, side="right"))
        while low < high:
            start = int(ends[i] - s.rows[i])
            take = min(int(ends[i]), high) - low
            out.append(Segment(int(s.file[i]), int(s.chunk[i]), low - start, take))
            low += take
            i += 1
        return out

    def after(self, done: int) -> EpochPlan:
        """The same epoch once ``done`` of its global batches were trained."""
        return EpochPlan(self.epoch, self.world, self.window_rows, self.streams, self.batch_dataset, self.per_rank,
                         self.window_dataset, self.window_number, done)


def plan_epoch(files: list[FileIndex], datasets: list[DataSet], seed: int, epoch: int, world: int,
               window_rows: int, shuffle: bool = True) -> EpochPlan:
    """The epoch's plan (``shuffle`` False: the files' order, every epoch)."""
    rng = plan_generator(seed, epoch)
    streams, batch_sets = [], []
    per_rank = np.asarray([ds.batch_size for ds in datasets], dtype=np.int64)
    for d, ds in enumerate(datasets):
        table = ChunkTable.of(files, ds.files)
        if shuffle:
            table = table.permuted(rng.permutation(len(table.rows)))
        streams.append(table)
        batch_sets.append(np.full(table.total // (ds.batch_size * world), d, dtype=np.int32))
    batch_dataset = np.concatenate(batch_sets) if batch_sets else np.empty(0, np.int32)
    if len(datasets) > 1 and shuffle:
        batch_dataset = batch_dataset[rng.permutation(len(batch_dataset))]
    w_set, w_num = _windows_in_order_of_need(batch_dataset, per_rank * world, window_rows, len(datasets))
    return EpochPlan(epoch, world, window_rows, streams, batch_dataset, per_rank, w_set, w_num)


def _windows_in_order_of_need(batch_dataset: np.ndarray, rows_per_batch: np.ndarray, window_rows: int,
                              n_sets: int) -> tuple[np.ndarray, np.ndarray]:
    """Every needed window (data set, number), ordered by the first global batch that needs its rows."""
    sets, numbers, first_need = [], [], []
    for d in range(n_sets):
        at = np.flatnonzero(batch_dataset == d)
        if not len(at):
            continue
        ends = np.arange(1, len(at) + 1, dtype=np.int64) * rows_per_batch[d]  # rows of d taken after each batch
        k = np.arange(math.ceil(int(ends[-1]) / window_rows), dtype=np.int64)
        first_need.append(at[np.searchsorted(ends, k * window_rows, side="right")])
        sets.append(np.full(len(k), d, dtype=np.int32))
        numbers.append(k)
    if not sets:
        return np.empty(0, np.int32), np.empty(0, np.int64)
    need, w_set, w_num = np.concatenate(first_need), np.concatenate(sets), np.concatenate(numbers)
    order = np.lexsort((w_num, w_set, need))
    return w_set[order], w_num[order]


def batches_per_epoch(files: list[FileIndex], datasets: list[DataSet], world: int) -> int:
    """Global batches in every epoch (the same for every epoch)."""
    return sum(sum(files[f].kept for f in ds.files) // (ds.batch_size * world) for ds in datasets)
