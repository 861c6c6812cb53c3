"""Training data on Ray Data: read triplet JSONL shards, validate, shuffle, sample groups, tokenize.

Flow (one way, streaming):

    TripletDatasource (one read task per file, line by line, every row validated)
      -> training pass (``training_pass``): each file's rows through a shuffle buffer, then each row
         cut to its group for the epoch: 1 positive + train_group_size-1 negatives (seeded by seed,
         epoch and the row's file:line, so the draw does not depend on which worker reads the row);
         the epoch comes from the EpochState actor, so every epoch reshuffles and redraws
      -> drop rows marked bad (only with ``skip_bad_rows``; otherwise the scan has already failed)
         and rows a resumed epoch already trained
      -> map_batches(tokenize_rows), 64 rows a task: instructions applied, the sampled texts tokenized
      -> each Ray Train worker: get_dataset_shard("train").iter_batches(...), then data/collate.py.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from bge_ray.config.finetune import DEFAULT_MAX_EXAMPLES, FinetuneConfig
from bge_ray.console import ProgressLine
from bge_ray.data.jsonl import JSONL_EXTENSIONS, expand_paths, iter_lines
from bge_ray.data.text import TextSpec
from bge_ray.data.triplets import MAX_ERRORS_KEPT, ROW_SCHEMA, DataSummary, RowRules, parse_line, sample_row
from bge_ray.errors import DataValidationError
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.seeds import file_sample_rng, file_shuffle_rng

_ROWS_PER_BLOCK = 512
TOKENIZE_BATCH_ROWS = 64  # rows per tokenize task: first batches leave after a few such tasks, not a whole file
IN_PROCESS_SCAN_BYTES = 256 << 20  # training data up to this size is validated on the driver, not by Ray tasks


class TripletDatasource(FileBasedDatasource):
    """Reads triplet JSONL files (plain or gzip) from local paths or any pyarrow filesystem URI.

    Every non-blank line becomes a row; a bad row keeps its ``error`` (``path:line: why``) so the
    pipeline can count or skip it instead of dying deep inside a Ray task.
    """

    _FILE_EXTENSIONS = JSONL_EXTENSIONS

    def __init__(self, paths: list[str] | str, rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                 seed: int = 42, **kwargs: Any) -> None:
        super().__init__(paths, file_extensions=JSONL_EXTENSIONS, **kwargs)
        self._rules = rules
        self._max_examples = max_examples
        self._seed = seed
        self._training = False
        self._shuffle_window = 0
        self._epoch_state: Any = None

    def files(self) -> list[str]:
        """Every data file this datasource reads (directories and globs resolved)."""
        return list(self._paths())

    def training_pass(self, shuffle_window: int, epoch_state: Any = None) -> TripletDatasource:
        """This datasource as an epoch's training pass: each file's rows go through a shuffle buffer
        of ``shuffle_window`` rows (0: file order), and each good row keeps only its sampled group
        (:func:`sample_row`). Both are seeded by the epoch an :class:`EpochState` actor holds (0
        without one), so every epoch reshuffles and draws new negatives."""
        source = copy.copy(self)
        source._training, source._shuffle_window, source._epoch_state = True, shuffle_window, epoch_state
        return source

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows = self._file_rows(f, path)
        if self._training:
            epoch = 0
            if self._epoch_state is not None:
                epoch = int(ray.get(self._epoch_state.epoch.remote()))
            if self._shuffle_window > 0:
                rows = window_shuffle(rows, self._shuffle_window, file_shuffle_rng(self._seed, epoch, path))
            group, seed = self._rules.train_group_size, self._seed
            rows = (sample_row(r, group, seed, epoch) if r["error"] is None else r for r in rows)
        block: list[dict] = []
        for row in rows:
            block.append(row)
            if len(block) >= _ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)

    def _file_rows(self, f: Any, path: str) -> Iterator[dict]:
        # With max_example_num_per_dataset below the row count, FlagEmbedding keeps a uniform
        # random sample; here a seeded reservoir of that many rows (held by this read task).
        capped = self._max_examples < DEFAULT_MAX_EXAMPLES
        rng = file_sample_rng(self._seed, path)
        reservoir: list[tuple[int, dict]] = []
        n_good = 0
        for line_no, raw in iter_lines(f):
            row = parse_line(raw, path, line_no, self._rules)
            if line_no == 1 and isinstance(raw, bytes) and raw.lstrip().startswith(b"["):
                row["error"] = f"{path}:1: the file is a JSON array; bge-ray reads JSON Lines (one object per line)"
                yield row
                return
            if capped and row["error"] is None:
                n_good += 1
                if len(reservoir) < self._max_examples:
                    reservoir.append((line_no, row))
                else:
                    j = rng.randrange(n_good)
                    if j < self._max_examples:
                        reservoir[j] = (line_no, row)
                continue
            yield row
        yield from (r for _, r in sorted(reservoir, key=lambda t: t[0]))


def window_shuffle(rows: Iterable[dict], window: int, rng: random.Random) -> Iterator[dict]:
    """Rows in a random order through a buffer of ``window`` rows: once it is full, each new row
    takes the place of a random one, which goes out. A row leaves at most ``window`` places before
    the place it came in, and any number after. Holds ``window`` rows, never the stream."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < window:
            buffer.append(row)
            continue
        j = rng.randrange(window)
        yield buffer[j]
        buffer[j] = row
    rng.shuffle(buffer)
    yield from buffer


def triplet_source(paths: list[str], rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                   seed: int = 42) -> TripletDatasource:
    """The datasource of the triplet files (lists directories and URIs; needs Ray up)."""
    return TripletDatasource(expand_paths(paths), rules, max_examples=max_examples, seed=seed)


def read_triplets(paths: list[str], rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                  seed: int = 42) -> ray.data.Dataset:
    """A Ray Dataset of validated triplet rows (bad rows carry their ``error``)."""
    return ray.data.read_datasource(triplet_source(paths, rules, max_examples=max_examples, seed=seed))


def _summarize_block(batch: pa.Table) -> pa.Table:
    errors = batch.column("error").to_pylist()
    bad = [e for e in errors if e is not None]
    per_file: dict[str, int] = {}
    for source, error in zip(batch.column("source").to_pylist(), errors, strict=True):
        per_file[source.rpartition(":")[0]] = per_file.get(source.rpartition(":")[0], 0) + (error is None)
    return pa.table({"good": [len(errors) - len(bad)], "bad": [len(bad)], "errors": [bad[:MAX_ERRORS_KEPT]],
                     "files": [list(per_file)], "file_rows": [list(per_file.values())]})


def _block_summaries(data: ray.data.Dataset | TripletDatasource) -> Iterator[dict[str, Any]]:
    """One summary per block. A datasource small enough is read right here, by its own read tasks
    (the same code Ray Data runs): on small data the pass then costs what parsing costs, not the
    seconds Ray Data needs to start its task workers. Larger data is scanned by Ray Data tasks."""
    if isinstance(data, TripletDatasource):
        size = data.estimate_inmemory_data_size()
        if size is not None and size <= IN_PROCESS_SCAN_BYTES:
            for task in data.get_read_tasks(1):
                for block in task():
                    yield from _summarize_block(block).to_pylist()
            return
        data = ray.data.read_datasource(data)
    parts = data.select_columns(["error", "source"]).map_batches(_summarize_block, batch_format="pyarrow",
                                                                 batch_size=None)
    yield from parts.iter_rows()


def scan_triplets(data: ray.data.Dataset | TripletDatasource, skip_bad_rows: bool) -> DataSummary:
    """Count usable rows, per file (of a dataset, or of a datasource: see :func:`_block_summaries`).

    Raises:
        DataValidationError: without ``skip_bad_rows``, the first bad row (file and line); and when
            no file holds a usable row (the empty ones named).
    """
    summary = DataSummary()
    with ProgressLine("scanning the training data", None, "rows", quiet_below_s=15) as progress:
        for part in _block_summaries(data):
            summary.num_rows += int(part["good"])
            summary.num_bad += int(part["bad"])
            for path, rows in zip(part["files"], part["file_rows"], strict=True):
                summary.rows_per_file[path] = summary.rows_per_file.get(path, 0) + int(rows)
            for err in part["errors"]:
                if len(summary.first_errors) < MAX_ERRORS_KEPT:
                    summary.first_errors.append(err)
            progress.add(int(part["good"]) + int(part["bad"]))
    files = data.files() if isinstance(data, TripletDatasource) else list(summary.rows_per_file)
    summary.empty_files = sorted(f for f in files if not summary.rows_per_file.get(f))
    if summary.num_bad and not skip_bad_rows:
        more = f" ({summary.num_bad - 1} more bad rows)" if summary.num_bad > 1 else ""
        raise DataValidationError(
            f"bad training row: {sorted(summary.first_errors)[0]}{more}. "
            "Fix the data, or set skip_bad_rows: true to skip bad rows and count them")
    if summary.num_rows == 0:
        where = f": {', '.join(summary.empty_files)} hold none" if summary.empty_files else ""
        raise DataValidationError(f"the training data holds no usable rows{where}")
    return summary


def tokenize_rows(batch: pa.Table, spec: TextSpec) -> pa.Table:
    """Apply instructions and tokenize every text of every row (truncated, not padded)."""
    tok = load_tokenizer(spec.tokenizer, spec.cache_dir, spec.trust_remote_code)
    queries = spec.format(batch.column("query").to_pylist(), "query", batch.column("prompt").to_pylist())
    pos = batch.column("pos").to_pylist()
    neg = batch.column("neg").to_pylist()
    flat = spec.format([t for texts in pos for t in texts] + [t for texts in neg for t in texts], "passage")
    q_ids = tok(queries, truncation=True, max_length=spec.query_max_len, add_special_tokens=True)["input_ids"]
    p_ids = tok(flat, truncation=True, max_length=spec.passage_max_len, add_special_tokens=True)["input_ids"] if flat else []
    pos_ids, neg_ids, k = [], [], 0
    for texts in pos:
        pos_ids.append(p_ids[k:k + len(texts)])
        k += len(texts)
    for texts in neg:
        neg_ids.append(p_ids[k:k + len(texts)])
        k += len(texts)
    ids_type = pa.list_(pa.list_(pa.int32()))
    return pa.table({
        "q_ids": pa.array(q_ids, type=pa.list_(pa.int32())),
        "pos_ids": pa.array(pos_ids, type=ids_type),
        "neg_ids": pa.array(neg_ids, type=ids_type),
        "pos_scores": batch.column("pos_scores"),
        "neg_scores": batch.column("neg_scores"),
        "row_key": batch.column("row_key"),
    })


def drop_bad(batch: pa.Table) -> pa.Table:
    """The rows without an ``error`` (bad rows are only still there with ``skip_bad_rows``)."""
    return batch.filter(pc.is_null(batch.column("error")))


class EpochState:
    """A Ray actor: the epoch being trained, and the row keys it leaves out (the rows trained before
    the checkpoint a run resumed from; empty otherwise). Rank 0 sets both at the start of each epoch;
    the pipeline's read tasks reshuffle by the epoch, and drop the keys."""

    def __init__(self) -> None:
        self.generation = 0
        self.current_epoch = 0
        self.keys = np.empty(0, dtype=np.int64)

    def begin(self, epoch: int, keys: np.ndarray) -> int:
        self.generation += 1
        self.current_epoch = int(epoch)
        self.keys = np.unique(np.asarray(keys, dtype=np.int64))
        return self.generation

    def epoch(self) -> int:
        return self.current_epoch

    def get(self, known_generation: int) -> tuple[int, np.ndarray | None]:
        """The keys, or None when the caller already holds this generation."""
        return self.generation, (None if known_generation == self.generation else self.keys)


_TRAINED_CACHE: dict[str, tuple[int, np.ndarray]] = {}  # per process: actor id -> (generation, keys)


def _usable_rows(batch: pa.Table, state: Any = None) -> pa.Table:
    """Drop bad rows (only there with skip_bad_rows) and rows this epoch already trained."""
    batch = drop_bad(batch)
    if state is None or batch.num_rows == 0:
        return batch
    cache_key = state._actor_id.hex()
    known, keys = _TRAINED_CACHE.get(cache_key, (-1, np.empty(0, dtype=np.int64)))
    generation, fresh = ray.get(state.get.remote(known))
    if fresh is not None:
        _TRAINED_CACHE[cache_key] = (generation, fresh)
        keys = fresh
    if len(keys) == 0:
        return batch
    keep = ~np.isin(batch.column("row_key").to_numpy(), keys)
    return batch.filter(pa.array(keep))


def build_train_dataset(cfg: FinetuneConfig, epoch_state: Any = None) -> tuple[ray.data.Dataset, DataSummary]:
    """Validate the training data (one streaming pass) and return the tokenized dataset and its summary.

    ``epoch_state``: an :class:`EpochState` actor; its epoch seeds each pass's shuffle and group
    draw, and its keys are left out of the pass while set.
    """
    # The driver prints its own progress (loss, groups/s); Ray Data's bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rules = RowRules(train_group_size=cfg.train_group_size, knowledge_distillation=cfg.knowledge_distillation)
    source = triplet_source(cfg.train_data, rules, max_examples=cfg.max_example_num_per_dataset, seed=cfg.seed)
    summary = scan_triplets(source, skip_bad_rows=cfg.skip_bad_rows)
    rows = ray.data.read_datasource(source.training_pass(cfg.shuffle_buffer_size, epoch_state))
    spec = TextSpec.from_config(cfg)
    # Small tokenize tasks, their output cut into small blocks: Train's equal split hands a block out
    # only once every worker can get as many rows, so with a few large blocks the first batch
    # waits for most of the epoch's tokenization.
    ds = rows.map_batches(_usable_rows, fn_kwargs={"state": epoch_state}, batch_format="pyarrow").map_batches(
        tokenize_rows, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS
    ).repartition(target_num_rows_per_block=TOKENIZE_BATCH_ROWS)  # fused into the task: its output leaves in small blocks
    return ds, summary
