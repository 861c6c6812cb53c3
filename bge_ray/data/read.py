"""Triplet JSONL rows as a Ray Dataset, every row validated (a bad one keeps its ``error``): what
``bge-ray mine`` and ``bge-ray score`` read. Training reads through the scan's index instead
(:mod:`bge_ray.data.scan`, :mod:`bge_ray.data.pipeline`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from bge_ray.config.finetune import DEFAULT_MAX_EXAMPLES
from bge_ray.console import ProgressLine
from bge_ray.data.jsonl import JSONL_EXTENSIONS, expand_paths, iter_lines
from bge_ray.data.triplets import MAX_ERRORS_KEPT, ROW_SCHEMA, DataSummary, RowRules, parse_line
from bge_ray.errors import DataValidationError
from bge_ray.seeds import file_sample_rng

_ROWS_PER_BLOCK = 512
IN_PROCESS_SCAN_BYTES = 256 << 20  # data up to this size is validated on the driver, not by Ray tasks


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

    def files(self) -> list[str]:
        """Every data file this datasource reads (directories and globs resolved)."""
        return list(self._paths())

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows = self._file_rows(f, path)
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


def drop_bad(batch: pa.Table) -> pa.Table:
    """The rows without an ``error`` (bad rows are only still there with ``skip_bad_rows``)."""
    return batch.filter(pc.is_null(batch.column("error")))
