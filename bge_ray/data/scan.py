"""The scan pass: every training row is read and validated once, before training, and every file
indexed (:class:`~bge_ray.data.plan.FileIndex`): its usable rows, where every ``chunk_rows``-th of
them starts, what its first row says (batch size, task type, group size) and whether its rows carry
teacher scores. One read task per file; small data is scanned right here, larger data by Ray Data
tasks across the cluster.

A compressed file cannot be read from the middle, so the scan also writes its plain copy to
``cache_path`` (once: a copy named by the file's path, size and modification time is reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from bge_ray.config.finetune import FinetuneConfig
from bge_ray.console import ProgressLine, log
from bge_ray.data.jsonl import JSONL_EXTENSIONS, expand_paths, iter_lines_at
from bge_ray.data.plan import (
    DataSet,
    FileIndex,
    batches_per_epoch,
    chunk_rows_for,
    group_datasets,
    window_rows_for,
)
from bge_ray.data.triplets import MAX_ERRORS_KEPT, DataSummary, RowRules, parse_line
from bge_ray.errors import DataValidationError
from bge_ray.seeds import file_sample_rng
from bge_ray.storage import filesystem, storage_root

IN_PROCESS_SCAN_BYTES = 256 << 20  # training data up to this size is scanned on the driver, not by Ray tasks
ROW_BYTES_GUESS = 256  # for the index's granularity only: rows are rarely smaller
COMPRESSION_GUESS = 4
READ_ERRORS = (OSError, EOFError, zlib.error)
SUMMARY_SCHEMA = pa.schema([
    ("path", pa.string()), ("read_path", pa.string()), ("rows", pa.int64()), ("bad", pa.int64()),
    ("errors", pa.list_(pa.string())), ("unreadable", pa.string()), ("chunk_lines", pa.binary()),
    ("chunk_offsets", pa.binary()), ("first_row", pa.string()), ("scored", pa.int64()), ("types", pa.list_(pa.string())),
])


class _Unreadable:
    """Stands in for a file that could not be opened, so its read task reports it by name."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __enter__(self) -> _Unreadable:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


class _Tee:
    """A stream that copies what is read from it to ``out``."""

    def __init__(self, f: Any, out: Any) -> None:
        self.f, self.out = f, out

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.out.write(data)
        return data


def plain_copy_name(path: str, info: pafs.FileInfo) -> str:
    """The name of a compressed file's plain copy: its path, size and modification time hashed."""
    stamp = f"{path}|{info.size}|{info.mtime_ns}"
    base = posixpath.basename(path)
    return f"{hashlib.sha1(stamp.encode()).hexdigest()[:20]}-{base[:-3] if base.endswith('.gz') else base}"


class ScanDatasource(FileBasedDatasource):
    """Triplet JSONL files (plain or gzip, local or any pyarrow file-system URI), one summary row per
    file: usable and bad rows, the first errors (``path:line: why``), chunk starts, first row."""

    _FILE_EXTENSIONS = JSONL_EXTENSIONS

    def __init__(self, paths: list[str] | str, rules: RowRules, cache_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(paths, file_extensions=JSONL_EXTENSIONS, **kwargs)
        given = [paths] if isinstance(paths, str) else list(paths)
        self.scheme = next((p.split("://")[0] for p in given if "://" in p and not p.startswith("file://")), None)
        self.rules = rules
        self.cache_path = cache_path
        sizes = [(p, s or 0) for p, s in zip(self._paths(), self._file_sizes(), strict=True)]
        guess = sum(s * (COMPRESSION_GUESS if p.endswith(".gz") else 1) for p, s in sizes) // ROW_BYTES_GUESS
        self.chunk_rows = chunk_rows_for(guess)

    def files(self) -> list[str]:
        """Every data file this datasource reads (directories and globs resolved), as URIs."""
        return [self.uri(p) for p in self._paths()]

    def uri(self, path: str) -> str:
        """A path as Ray Data lists it (a bucket path without its scheme) as the URI it came from."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> Any:
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except READ_ERRORS as e:  # no permission, a missing object, a dead endpoint: named by the scan
            return _Unreadable(e)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        path = self.uri(path)
        if isinstance(f, _Unreadable):
            yield _summary(path, path, {"unreadable": f"{path}: cannot be opened: {f.error}"})
            return
        if not path.endswith(".gz"):
            yield self._scan(f, path, path)
            return
        yield self._scan_compressed(f, path)

    def _scan_compressed(self, f: Any, path: str) -> pa.Table:
        """Scan a compressed file, reading its plain copy when one exists, else writing it."""
        if not self.cache_path:
            return _summary(path, path, {"unreadable": f"{path}: a compressed file needs cache_path for its plain copy"})
        fs, root = filesystem(self.cache_path)
        source_fs, inner = filesystem(path)
        copy = f"{root.rstrip('/')}/{plain_copy_name(path, source_fs.get_file_info(inner))}"
        where = f"{self.cache_path.rstrip('/')}/{posixpath.basename(copy)}"
        if fs.get_file_info(copy).type == pafs.FileType.File:
            with fs.open_input_stream(copy) as plain:
                return self._scan(plain, path, where)
        fs.create_dir(root, recursive=True)
        partial = f"{copy}.partial-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(partial) as out:
            summary = self._scan(_Tee(f, out), path, where)
        if summary.column("unreadable")[0].as_py() is None:
            fs.move(partial, copy)
        else:
            fs.delete_file(partial)
        return summary

    def _scan(self, f: Any, path: str, read_path: str) -> pa.Table:
        """One file's summary (see :data:`SUMMARY_SCHEMA`); rows are named by ``path``."""
        s = {"rows": 0, "bad": 0, "errors": [], "scored": 0, "types": set(), "first": {}}
        lines, offsets, last = array("q"), array("q"), 0
        try:
            for line_no, offset, raw in iter_lines_at(f):
                last = line_no
                if line_no == 1 and isinstance(raw, bytes) and raw.lstrip().startswith(b"["):
                    s["bad"] += 1
                    s["errors"].append(f"{path}:1: the file is a JSON array; bge-ray reads JSON Lines (one object per line)")
                    break
                row = parse_line(raw, path, line_no, self.rules)
                if row["error"] is not None:
                    s["bad"] += 1
                    if len(s["errors"]) < MAX_ERRORS_KEPT:
                        s["errors"].append(row["error"])
                    continue
                if s["rows"] % self.chunk_rows == 0:
                    lines.append(line_no)
                    offsets.append(offset)
                _count(s, row)
        except READ_ERRORS as e:  # a truncated or corrupt compressed file, an object that went away
            s["unreadable"] = f"{path}: cannot be read past line {last}: {e}"
        return _summary(path, read_path, s, lines, offsets)


def _count(s: dict[str, Any], row: dict[str, Any]) -> None:
    if not s["first"]:
        s["first"] = {"batch_size": row["batch_size"], "type": row["type"],
                      "train_group_size": row["train_group_size"], "num_neg": len(row["neg"])}
    s["scored"] += bool(row["pos_scores"]) and bool(row["neg_scores"])
    s["types"].add(row["type"] or "")
    s["rows"] += 1


def _summary(path: str, read_path: str, s: dict[str, Any], lines: array | None = None,
             offsets: array | None = None) -> pa.Table:
    return pa.Table.from_pylist([{
        "path": path, "read_path": read_path, "rows": s.get("rows", 0), "bad": s.get("bad", 0),
        "errors": s.get("errors", []), "unreadable": s.get("unreadable"),
        "chunk_lines": (lines or array("q")).tobytes(), "chunk_offsets": (offsets or array("q")).tobytes(),
        "first_row": json.dumps(s.get("first", {})), "scored": s.get("scored", 0), "types": sorted(s.get("types", ())),
    }], schema=SUMMARY_SCHEMA)


def _summaries(source: ScanDatasource) -> Iterator[dict[str, Any]]:
    """One summary per file: read here for small data (the same read tasks Ray Data would run: on
    small data the pass costs what parsing costs, not the seconds Ray Data takes to start), else by
    Ray Data tasks."""
    size = source.estimate_inmemory_data_size()
    if size is not None and size <= IN_PROCESS_SCAN_BYTES:
        for task in source.get_read_tasks(1):
            for block in task():
                yield from block.to_pylist()
        return
    yield from ray.data.read_datasource(source).iter_rows()


def scan(paths: list[str], rules: RowRules, skip_bad_rows: bool, max_examples: int, seed: int,
         cache_path: str | None = None) -> tuple[list[FileIndex], DataSummary]:
    """Validate and index every training file.

    Raises:
        DataValidationError: a file that cannot be opened or read to its end (truncated, corrupt, no
            permission), whatever ``skip_bad_rows``; without ``skip_bad_rows``, the first bad row
            (file and line); and no usable row at all (the empty files named).
    """
    expanded = expand_paths(paths)
    try:
        source = ScanDatasource(expanded, rules, cache_path)
    except READ_ERRORS as e:  # a path that went away, a bucket that refuses the listing
        where = next((p for p in expanded if p.split("://")[-1] in str(e)), ", ".join(expanded))
        raise DataValidationError(f"{where}: cannot be listed: {type(e).__name__}: {e}") from None
    summary, files = DataSummary(), []
    with ProgressLine("scanning the training data", len(source.files()), "files", quiet_below_s=15) as progress:
        for part in sorted(_summaries(source), key=lambda p: p["path"]):
            if part["unreadable"]:
                raise DataValidationError(part["unreadable"])
            files.append(_file_index(part, source.chunk_rows, max_examples, seed))
            summary.num_rows += files[-1].kept
            summary.num_bad += part["bad"]
            summary.rows_per_file[part["path"]] = files[-1].kept
            summary.first_errors.extend(part["errors"][:MAX_ERRORS_KEPT - len(summary.first_errors)])
            progress.add(1)
    summary.empty_files = sorted(f.path for f in files if f.kept == 0)
    if summary.num_bad and not skip_bad_rows:
        more = f" ({summary.num_bad - 1} more bad rows)" if summary.num_bad > 1 else ""
        raise DataValidationError(f"bad training row: {sorted(summary.first_errors)[0]}{more}. "
                                  "Fix the data, or set skip_bad_rows: true to skip bad rows and count them")
    if summary.num_rows == 0:
        where = f": {', '.join(summary.empty_files)} hold none" if summary.empty_files else ""
        raise DataValidationError(f"the training data holds no usable rows{where}")
    return files, summary


def _file_index(part: dict[str, Any], chunk_rows: int, max_examples: int, seed: int) -> FileIndex:
    rows = part["rows"]
    keep = None
    if rows > max_examples:  # FlagEmbedding keeps a uniform random sample; here a seeded one, the same every epoch
        keep = np.asarray(sorted(file_sample_rng(seed, part["path"]).sample(range(rows), max_examples)), np.int64)
    if 0 < part["scored"] < rows:
        raise DataValidationError(f"{part['path']}: {part['scored']} of its {rows} rows carry teacher scores "
                                  "(pos_scores / neg_scores): give them to every row of a file, or to none")
    return FileIndex(part["path"], part["read_path"], rows, np.frombuffer(part["chunk_lines"], np.int64),
                     np.frombuffer(part["chunk_offsets"], np.int64), chunk_rows, keep, json.loads(part["first_row"]),
                     rows > 0 and part["scored"] == rows, tuple(part["types"]))


@dataclass
class TrainingData:
    """What a fine-tune trains on: the indexed files, the data sets they form, how rows are checked and
    drawn, and what the scan found."""

    files: list[FileIndex]
    datasets: list[DataSet]
    summary: DataSummary
    rules: RowRules
    window_rows: int
    shuffle: bool
    dropped: list[str]

    def batches_per_epoch(self, world: int) -> int:
        return batches_per_epoch(self.files, self.datasets, world)

    def describe(self) -> str:
        text = self.summary.describe()
        if len(self.datasets) > 1:
            text += f"; {len(self.datasets)} data sets, every batch from one of them"
        if self.dropped:
            text += "; left out: " + "; ".join(self.dropped)
        return text


def train_data_folders(train_data: list[str], paths: list[str]) -> dict[int, str]:
    """File -> the train_data folder it was listed from (files named directly are not in it)."""
    folders = [p.rstrip("/") for p in train_data if _is_folder(p)]
    out = {}
    for i, path in enumerate(paths):
        for folder in folders:
            if path.split("://", 1)[-1].startswith(folder.split("://", 1)[-1] + "/"):
                out[i] = folder
    return out


def _is_folder(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def load_training_data(cfg: FinetuneConfig, cache_path: str | None = None) -> TrainingData:
    """Scan and index ``train_data`` and form its data sets (one, unless same_dataset_within_batch).
    Compressed files' plain copies go to ``cache_path``, else ``cfg.cache_path``, else
    ``<storage_path>/bge-ray-cache``.

    Raises:
        DataValidationError: a bad row or unreadable file (see :func:`scan`); with
            same_dataset_within_batch, a file whose rows name different task types; every file left out.
    """
    same = cfg.same_dataset_within_batch
    rules = RowRules(train_group_size=cfg.train_group_size, knowledge_distillation=cfg.knowledge_distillation and not same)
    cache_path = cache_path or cfg.cache_path or f"{storage_root(cfg.storage_path).rstrip('/')}/bge-ray-cache"
    files, summary = scan(cfg.train_data, rules, cfg.skip_bad_rows, cfg.max_example_num_per_dataset, cfg.seed,
                          cache_path)
    if same:
        for f in files:
            kinds = [t for t in f.types if t]
            if len(kinds) > 1 or (kinds and "" in f.types):
                raise DataValidationError(f"{f.path}: its rows name different task types ({', '.join(f.types)}); "
                                          "same_dataset_within_batch trains each file's rows as one task")
    folders = train_data_folders(cfg.train_data, [f.path for f in files])
    datasets, dropped = group_datasets(files, folders, cfg.per_device_train_batch_size, cfg.train_group_size,
                                       same, cfg.small_threshold, cfg.drop_threshold)
    if not datasets:
        raise DataValidationError("every training file was left out: " + "; ".join(dropped))
    if dropped:
        log("left out: " + "; ".join(dropped))
    chunk_rows = files[0].chunk_rows
    return TrainingData(files, datasets, summary, rules, window_rows_for(cfg.shuffle_buffer_size, chunk_rows),
                        cfg.shuffle_buffer_size > 0, dropped)
