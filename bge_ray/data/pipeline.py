"""An epoch's training data on Ray Data, in the plan's order (see :mod:`bge_ray.data.plan`).

    plan (windows, global batches: arithmetic on the scan's index, in the object store)
      -> WindowDatasource: read tasks of one or a few windows each: a window's chunks read by byte
         range, every row validated again, the rows shuffled (seeded by seed, epoch and the window),
         rows trained before a resume left out, each row cut to its group for the epoch (1 positive +
         group_size-1 negatives, seeded by seed, epoch and the row's file:line)
      -> map_batches(tokenize_rows), 64 rows a task: instructions applied, the drawn texts tokenized
         (a reranker's: tokenize_pairs, each query with each of its drawn passages; icl's:
         tokenize_icl_rows, queries left as text for the worker to add examples)
      -> BatchRouter (a Ray actor): reads the stream in order (Ray Data keeps it), cuts it into the
         plan's global batches and hands slice r of each to worker r.

Every worker gets the same batches in the same order on every run of the same config: the order
is the plan's, not the order in which Ray happens to finish tasks.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from bge_ray.cluster import side_actor
from bge_ray.config.finetune import FinetuneConfig
from bge_ray.data.icl import tokenize_icl_rows
from bge_ray.data.jsonl import iter_lines_at
from bge_ray.data.pairs import tokenize_pairs
from bge_ray.data.plan import DataSet, EpochPlan, FileIndex, Segment, plan_epoch
from bge_ray.data.scan import TrainingData
from bge_ray.data.text import TextSpec, carried_columns, regroup
from bge_ray.data.triplets import ROW_SCHEMA, RowRules, parse_line, sample_row
from bge_ray.errors import DataValidationError
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.seeds import text_shuffle_rng, window_rng
from bge_ray.storage import filesystem

TOKENIZE_BATCH_ROWS = 64  # rows per tokenize task: the first batches leave after a few such tasks
PREFETCH_BATCHES = 4  # global batches the router holds ready ahead of the workers
MAX_READ_TASKS = 20_000  # more windows than this: several windows a read task
READ_THREADS = 8  # chunks of one window fetched at once (remote storage: latency, not bandwidth)
STREAM_SCHEMA = (ROW_SCHEMA.append(pa.field("dataset", pa.int32())).append(pa.field("symmetric", pa.bool_()))
                 .append(pa.field("num_neg", pa.int64())))


@dataclass(frozen=True)
class StreamSettings:
    """How an epoch's rows are drawn: the run's seed, whether rows are shuffled (False: the files'
    order) and FlagEmbedding's ``shuffle_ratio`` (positives cut in three and reordered)."""

    seed: int
    shuffle: bool = True
    shuffle_ratio: float = 0.0
    order_seed: int | None = None  # data_seed: the order's own seed (else seed)

    @property
    def order(self) -> int:
        return self.seed if self.order_seed is None else self.order_seed


@dataclass(frozen=True, eq=False)
class EpochReads:
    """Everything a read task needs, put in the object store once per epoch."""

    files: list[FileIndex]
    datasets: list[DataSet]
    plan: EpochPlan
    rules: RowRules
    settings: StreamSettings


def _read_bytes(fs: pafs.FileSystem, path: str, start: int, end: int | None) -> bytes:
    """Bytes ``start`` .. ``end`` of a plain file (to its end for None)."""
    with fs.open_input_file(path) as f:
        f.seek(start)
        return f.read() if end is None else f.read(end - start)


def _segment_rows(reads: EpochReads, seg: Segment) -> list[dict]:
    """The kept rows ``seg`` names, read by byte range and validated again."""
    f = reads.files[seg.file]
    start = int(f.chunk_offsets[seg.chunk])
    end = int(f.chunk_offsets[seg.chunk + 1]) if seg.chunk + 1 < len(f.chunk_offsets) else None
    fs, inner = filesystem(f.read_path)
    try:
        data = _read_bytes(fs, inner, start, end)
    except OSError as e:
        raise DataValidationError(f"{f.path}: cannot be read at byte {start}: {e}") from None
    keep = f.kept_in_chunk(seg.chunk)
    keep_set = None if keep is None else set(keep.tolist())
    rows, ordinal = [], seg.chunk * f.chunk_rows
    for line_no, _, raw in iter_lines_at(io.BytesIO(data), first_line=int(f.chunk_lines[seg.chunk]), start=start):
        row = parse_line(raw, f.path, line_no, reads.rules)
        if row["error"] is not None:
            continue  # counted by the scan (skip_bad_rows); not a usable row
        if keep_set is None or ordinal in keep_set:
            rows.append(row)
        ordinal += 1
        if ordinal >= (seg.chunk + 1) * f.chunk_rows:
            break
    got = rows[seg.skip:seg.skip + seg.take]
    if len(got) != seg.take:
        raise DataValidationError(f"{f.path} changed since it was scanned: from line {int(f.chunk_lines[seg.chunk])} "
                                  f"on it holds {len(rows)} usable rows where {seg.skip + seg.take} were found")
    return got


def shuffle_text(text: str, ratio: float, rng: Any) -> str:
    """FlagEmbedding's ``shuffle_ratio``: with probability ``ratio``, a text over 100 characters is cut
    in three pieces that are put back in a random order, joined by spaces."""
    if ratio <= 0 or len(text) <= 100 or rng.random() >= ratio:
        return text
    size = len(text) // 3 + 1
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    rng.shuffle(pieces)
    return " ".join(pieces)


def window_rows(reads: EpochReads, dataset: int, number: int, trained: int, pool: ThreadPoolExecutor | None) -> pa.Table:
    """One window's rows: read, shuffled, the ``trained`` first ones dropped, each cut to its group."""
    segments = reads.plan.segments(dataset, number)
    parts = pool.map(functools.partial(_segment_rows, reads), segments) if pool else (
        _segment_rows(reads, s) for s in segments)
    rows = [row for part in parts for row in part]
    s, ds, epoch = reads.settings, reads.datasets[dataset], reads.plan.epoch
    if s.shuffle:
        window_rng(s.order, epoch, dataset, number).shuffle(rows)
    out = []
    for row in rows[trained:]:
        row = dict(sample_row(row, ds.group_size, s.seed, epoch), dataset=dataset, symmetric=ds.symmetric,
                   num_neg=len(row["neg"] or []))
        if s.shuffle_ratio > 0:
            rng = text_shuffle_rng(s.seed, epoch, row["row_key"])
            row["pos"] = [shuffle_text(t, s.shuffle_ratio, rng) for t in row["pos"]]
        out.append(row)
    return pa.Table.from_pylist(out, schema=STREAM_SCHEMA)


_READS_CACHE: dict[str, EpochReads] = {}  # per process: the epoch's plan, fetched once


def read_windows(holder: list[Any], windows: list[tuple[int, int, int]]) -> Iterator[pa.Table]:
    """A read task: each of ``windows`` (data set, number, rows trained before) as one block.
    ``holder`` wraps the :class:`EpochReads` object ref (a bare ref would be resolved by Ray)."""
    ref = holder[0]
    reads = _READS_CACHE.get(ref.hex())
    if reads is None:
        _READS_CACHE.clear()
        reads = _READS_CACHE[ref.hex()] = ray.get(ref)
    remote = any("://" in f.read_path for f in reads.files)
    with ThreadPoolExecutor(READ_THREADS) if remote else _no_pool() as pool:
        for dataset, number, trained in windows:
            yield window_rows(reads, dataset, number, trained, pool)


class _no_pool:  # noqa: N801 - stands where a ThreadPoolExecutor would
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


class WindowDatasource(Datasource):
    """The windows of an epoch's plan, in the plan's order."""

    def __init__(self, reads_ref: Any, windows: list[tuple[int, int, int]], window_rows: int) -> None:
        self.reads_ref, self.windows, self.window_rows = reads_ref, windows, window_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        per_task = max(1, math.ceil(len(self.windows) / MAX_READ_TASKS))
        tasks = []
        for i in range(0, len(self.windows), per_task):
            group = self.windows[i:i + per_task]
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            tasks.append(ReadTask(functools.partial(read_windows, [self.reads_ref], group), meta))
        return tasks


def tokenize_rows(batch: pa.Table, spec: TextSpec) -> pa.Table:
    """Apply instructions and tokenize every drawn text of every row (truncated, not padded). Passages
    of symmetric task types (sts, clustering) are texts like the queries: they get the query's
    instruction, as in FlagEmbedding."""
    tok = load_tokenizer(spec.tokenizer, spec.cache_dir, spec.trust_remote_code, spec.use_fast_tokenizer,
                         spec.special_tokens)
    prompts = batch.column("prompt").to_pylist()
    symmetric = batch.column("symmetric").to_pylist() if "symmetric" in batch.column_names else [False] * len(prompts)
    queries = spec.format(batch.column("query").to_pylist(), "query", prompts)
    texts = []
    for column in ("pos", "neg"):
        for texts_of_row, prompt, sym in zip(batch.column(column).to_pylist(), prompts, symmetric, strict=True):
            texts.append([spec.query(t, prompt) if sym else spec.passage(t) for t in texts_of_row or []])
    flat = [t for row in texts for t in row]
    q_ids = tok(queries, truncation=True, max_length=spec.query_max_len, add_special_tokens=True)["input_ids"]
    p_ids = tok(flat, truncation=True, max_length=spec.passage_max_len, add_special_tokens=True)["input_ids"] if flat else []
    nested = regroup(p_ids, [len(row) for row in texts])
    n = batch.num_rows
    ids_type = pa.list_(pa.list_(pa.int32()))
    out = {"q_ids": pa.array(q_ids, type=pa.list_(pa.int32())), "pos_ids": pa.array(nested[:n], type=ids_type),
           "neg_ids": pa.array(nested[n:], type=ids_type), **carried_columns(batch)}
    return pa.table(out)


def epoch_stream(reads_ref: Any, plan: EpochPlan, spec: TextSpec | None) -> ray.data.Dataset:
    """The epoch's rows (those left after ``plan.done`` batches) in the plan's order, tokenized (raw,
    for a preview, without ``spec``)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # bge-ray prints its own progress
    ctx.execution_options.preserve_order = True  # the plan's order, whatever finishes first
    ds = ray.data.read_datasource(WindowDatasource(reads_ref, plan.windows(), plan.window_rows))
    if spec is not None:
        tokenize = tokenize_pairs if spec.pairs else tokenize_icl_rows if spec.icl_suffix is not None else tokenize_rows
        ds = ds.map_batches(tokenize, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS)
    return ds


def numpy_batch(table: pa.Table) -> dict[str, Any]:
    """A table as the workers take batches: a numpy array per column (arrays of lists for list columns)."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type):
            values = np.empty(table.num_rows, dtype=object)
            values[:] = column.to_pylist()
            out[name] = values
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


class BatchRouter:
    """A Ray actor that runs each epoch's pipeline and hands every worker its slice of each global
    batch, in the plan's order: ``begin`` (from one worker), then ``next`` from each worker."""

    def __init__(self, files: list[FileIndex], datasets: list[DataSet], rules: RowRules, spec: TextSpec | None,
                 settings: StreamSettings, world: int, window_rows: int) -> None:
        self.files, self.datasets, self.rules, self.spec = files, datasets, rules, spec
        self.settings, self.world, self.window_rows = settings, world, window_rows
        self.cond = threading.Condition()
        self.queues: list[collections.deque] = []
        self.generation = 0
        self.error: BaseException | None = None

    def begin(self, epoch: int, done: int = 0) -> int:
        """Start ``epoch`` with ``done`` of its global batches already trained; the batches left."""
        s = self.settings
        plan = plan_epoch(self.files, self.datasets, s.order, epoch, self.world, self.window_rows, s.shuffle).after(done)
        with self.cond:
            self.generation += 1
            self.queues = [collections.deque() for _ in range(self.world)]
            self.error = None
            self.cond.notify_all()
        reads_ref = ray.put(EpochReads(self.files, self.datasets, plan, self.rules, s))
        stream = epoch_stream(reads_ref, plan, self.spec)
        threading.Thread(target=self._produce, args=(plan, stream, reads_ref, self.generation), daemon=True).start()
        return plan.batches

    def _produce(self, plan: EpochPlan, stream: ray.data.Dataset, reads_ref: Any, generation: int) -> None:
        """Cut the stream into the plan's global batches and queue each worker's slice."""
        buffers: dict[int, list[pa.Table]] = collections.defaultdict(list)
        held: dict[int, int] = collections.defaultdict(int)
        blocks = iter(stream.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            for d in plan.batch_dataset[plan.done:].tolist():
                per_rank = int(plan.per_rank[d])
                need = per_rank * self.world
                while held[d] < need:
                    _take_block(next(blocks), buffers, held)
                rows = pa.concat_tables(buffers[d])
                buffers[d], held[d] = [rows.slice(need)], held[d] - need
                slices = [rows.slice(r * per_rank, per_rank) for r in range(self.world)]
                if self.datasets[d].kind == "symmetric_class":
                    slices = [class_group(part, self.datasets[d].group_size) for part in slices]
                if not self._put([(d, part) for part in slices], generation):
                    return
            self._put([None] * self.world, generation)
        except BaseException as e:  # handed to the workers: their next() raises it
            with self.cond:
                if generation == self.generation:
                    self.error = e
                    self.cond.notify_all()
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()  # stops the stream's tasks when a new epoch (or a restart) takes over
            del reads_ref

    def _put(self, items: list[Any], generation: int) -> bool:
        with self.cond:
            # the workers run in lockstep: a full queue (a worker behind) holds the producer back
            while generation == self.generation and max(len(q) for q in self.queues) >= PREFETCH_BATCHES:
                self.cond.wait()
            if generation != self.generation:
                return False
            for q, item in zip(self.queues, items, strict=True):
                q.append(item)
            self.cond.notify_all()
            return True

    def next(self, rank: int) -> tuple[int, pa.Table] | None:
        """Worker ``rank``'s next (data set, rows) of the epoch, or None when the epoch is over."""
        with self.cond:
            while not self.queues[rank] and self.error is None:
                self.cond.wait()
            if self.error is not None and not self.queues[rank]:
                raise self.error
            item = self.queues[rank].popleft()
            self.cond.notify_all()
            return item


def class_group(part: pa.Table, cap: int) -> pa.Table:
    """FlagEmbedding's ``symmetric_class`` group: as many passages as the first row of a worker's batch
    has negatives + 1, at most ``cap`` (its other rows keep that many of their drawn negatives)."""
    keep = min(int(part.column("num_neg")[0].as_py()) + 1, cap) - 1
    out = part
    for name in ("neg_ids", "neg", "neg_scores"):
        if name in part.column_names:
            column = part.column(name)
            values = [v[:keep] if v is not None else v for v in column.to_pylist()]
            out = out.set_column(out.column_names.index(name), name, pa.array(values, type=column.type))
    return out


def start_router(cfg: FinetuneConfig, data: TrainingData, tokenize: bool = True) -> Any:
    """The actor that streams every epoch's batches to ``cfg.num_workers`` workers, tokenized (raw rows
    for a preview with ``tokenize`` False); on the driver's node (:func:`bge_ray.cluster.side_actor`),
    restarted if it dies."""
    spec = TextSpec.from_config(cfg) if tokenize else None
    settings = StreamSettings(cfg.seed, data.shuffle, cfg.shuffle_ratio, cfg.data_seed)
    return ray.remote(BatchRouter).options(
        max_concurrency=cfg.num_workers + 4, max_restarts=-1, max_task_retries=-1, **side_actor()).remote(
        data.files, data.datasets, data.rules, spec, settings, cfg.num_workers, data.window_rows)


def _take_block(block: pa.Table, buffers: dict[int, list[pa.Table]], held: dict[int, int]) -> None:
    """File a block's rows under their data sets (a tokenized block may hold the ends of two windows)."""
    sets = pc.unique(block.column("dataset")).to_pylist()
    for d in sets:
        part = block if len(sets) == 1 else block.filter(pc.equal(block.column("dataset"), d))
        buffers[d].append(part)
        held[d] += part.num_rows


def router_batches(router: Any, rank: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Worker ``rank``'s (data set, batch) of the epoch the router began."""
    while (item := ray.get(router.next.remote(rank))) is not None:
        yield item[0], numpy_batch(item[1])
