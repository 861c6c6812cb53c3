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
      -> each Ray Train worker: get_dataset_shard("train").iter_batches(...)
      -> GroupCollator: pad to the longest sequence in the batch.

A row is ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` with optional ``pos_scores``,
``neg_scores`` (teacher scores, same lengths as ``pos``/``neg``) and ``prompt`` (a query
instruction for this row that overrides ``query_instruction_for_retrieval``).
"""

from __future__ import annotations

import codecs
import copy
import functools
import glob
import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

if TYPE_CHECKING:
    import ray.data

    from bge_ray.config import FinetuneConfig

TRIPLET_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz"]
_MAX_ERRORS_KEPT = 5
_ROWS_PER_BLOCK = 512
TOKENIZE_BATCH_ROWS = 64  # rows per tokenize task: first batches leave after a few such tasks, not a whole file
_READ_CHUNK = 1 << 20
MAX_LINE_BYTES = 16 << 20  # one row; longer lines are reported, never read whole
MAX_TEXTS_PER_ROW = 10_000
IN_PROCESS_SCAN_BYTES = 256 << 20  # training data up to this size is validated on the driver, not by Ray tasks
DEFAULT_MAX_EXAMPLES = 100_000_000

ROW_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("pos", pa.list_(pa.string())),
        ("neg", pa.list_(pa.string())),
        ("pos_scores", pa.list_(pa.float64())),
        ("neg_scores", pa.list_(pa.float64())),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("row_key", pa.int64()),
        ("error", pa.string()),
    ]
)


class DataValidationError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class RowRules:
    """What a valid row must satisfy, from the config."""

    train_group_size: int = 8
    knowledge_distillation: bool = False

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> RowRules:
        return cls(train_group_size=cfg.train_group_size, knowledge_distillation=cfg.knowledge_distillation)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_texts(row: dict, key: str, required: bool) -> str | None:
    if key not in row:
        return f"missing '{key}'" if required else None
    value = row[key]
    if not isinstance(value, list):
        return f"'{key}' must be a list of strings, got {type(value).__name__}"
    if len(value) > MAX_TEXTS_PER_ROW:
        return f"'{key}' has {len(value)} passages, more than the {MAX_TEXTS_PER_ROW} one row may hold"
    if required and not value:
        return f"'{key}' is empty: each row needs at least one {key} passage"
    for i, text in enumerate(value):
        if not isinstance(text, str):
            return f"'{key}[{i}]' must be a string, got {type(text).__name__}"
        if not text.strip():
            return f"'{key}[{i}]' is an empty string"
    return None


def _check_scores(row: dict, key: str, texts_key: str, required: bool) -> str | None:
    if key not in row or row[key] is None:
        if required:
            return f"knowledge_distillation needs '{key}' (teacher scores; `bge-ray score` adds them)"
        return None
    scores = row[key]
    if not isinstance(scores, list):
        return f"'{key}' must be a list of numbers, got {type(scores).__name__}"
    for i, s in enumerate(scores):
        if not _is_number(s):
            return f"'{key}[{i}]' must be a finite number, got {s!r}"
    n_texts = len(row.get(texts_key) or [])
    if len(scores) != n_texts:
        return f"'{key}' has {len(scores)} scores but '{texts_key}' has {n_texts} texts"
    return None


def validate_row(obj: Any, rules: RowRules) -> str | None:
    """Return why ``obj`` is not a usable training row, or None if it is."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    query = obj.get("query")
    if "query" not in obj:
        return "missing 'query'"
    if not isinstance(query, str):
        return f"'query' must be a string, got {type(query).__name__}"
    if not query.strip():
        return "'query' is empty"
    for key, required in (("pos", True), ("neg", False)):
        err = _check_texts(obj, key, required)
        if err:
            return err
    if rules.train_group_size > 1 and not obj.get("neg"):
        return (
            f"has no negatives but train_group_size is {rules.train_group_size}: "
            "mine negatives first (bge-ray mine) or set train_group_size: 1 to train on in-batch negatives only"
        )
    for key, texts_key in (("pos_scores", "pos"), ("neg_scores", "neg")):
        err = _check_scores(obj, key, texts_key, rules.knowledge_distillation)
        if err:
            return err
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return f"'prompt' must be a string, got {type(prompt).__name__}"
    return None


def row_key(path: str, line: int) -> int:
    """A stable 63-bit id for a row (its file and line): seeds its per-epoch sampling and marks it as
    trained in a checkpoint, so a resumed epoch can leave it out."""
    digest = hashlib.blake2b(f"{path}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def parse_line(raw: bytes | LineTooLong, path: str, line: int, rules: RowRules) -> dict:
    """Parse and validate one JSONL line into a row dict (``error`` set when the row is bad)."""
    source = f"{path}:{line}"
    out = {"query": None, "pos": [], "neg": [], "pos_scores": [], "neg_scores": [], "prompt": None,
           "source": source, "row_key": row_key(path, line), "error": None}
    obj, err = decode_json_line(raw, source)
    if err:
        out["error"] = err
        return out
    err = validate_row(obj, rules)
    if err:
        out["error"] = f"{source}: {err}"
        return out
    out["query"] = obj["query"]
    out["pos"] = obj["pos"]
    out["neg"] = obj.get("neg") or []
    out["pos_scores"] = [float(s) for s in obj.get("pos_scores") or []]
    out["neg_scores"] = [float(s) for s in obj.get("neg_scores") or []]
    out["prompt"] = obj.get("prompt")
    return out


class LineTooLong:
    """Stands in for a line longer than the reader keeps in memory (its bytes were not read into one buffer)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def iter_lines(f: Any, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """Yield (1-based line number, bytes) for each non-blank line of a binary stream.

    A line longer than ``max_line_bytes`` is never held whole: it is yielded as :class:`LineTooLong`
    (its size) so the caller can report it, and reading goes on at the next line.
    """
    parts: list[bytes] = []  # the current line so far (dropped once it is too long)
    size = 0
    line_no = 0

    def finish() -> bytes | LineTooLong | None:
        if size > max_line_bytes:
            return LineTooLong(size)
        raw = b"".join(parts)
        return raw if raw.strip() else None

    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            size += len(piece)
            if size <= max_line_bytes:
                parts.append(piece)
            else:
                parts = []
            if i == len(pieces) - 1:
                break  # the line goes on in the next chunk
            line_no += 1
            line = finish()
            if line is not None:
                yield line_no, line
            parts, size = [], 0
    if size:
        line = finish()
        if line is not None:
            yield line_no + 1, line


def decode_json_line(raw: bytes | LineTooLong, where: str) -> tuple[Any, str | None]:
    """``(object, None)`` for a line holding one JSON value, else ``(None, "where: why")``."""
    if isinstance(raw, LineTooLong):
        return None, (f"{where}: the line is {raw.size / 2 ** 20:.1f} MiB, over the "
                      f"{MAX_LINE_BYTES / 2 ** 20:.0f} MiB limit for one row")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None, f"{where}: the file is UTF-16; save it as UTF-8"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"{where}: not valid JSON (nested too deeply)"
    except ValueError as e:  # e.g. an integer literal longer than Python converts
        return None, f"{where}: not valid JSON ({e})"


class TripletDatasource(FileBasedDatasource):
    """Reads triplet JSONL files (plain or gzip) from local paths or any pyarrow filesystem URI.

    Every non-blank line becomes a row; a bad row keeps its ``error`` (``path:line: why``) so the
    pipeline can count or skip it instead of dying deep inside a Ray task.
    """

    _FILE_EXTENSIONS = TRIPLET_EXTENSIONS

    def __init__(self, paths: list[str] | str, rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                 seed: int = 42, **kwargs: Any) -> None:
        super().__init__(paths, file_extensions=TRIPLET_EXTENSIONS, **kwargs)
        self._rules = rules
        self._max_examples = max_examples
        self._seed = seed
        self._training = False
        self._shuffle_window = 0
        self._epoch_state: Any = None

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
                import ray

                epoch = int(ray.get(self._epoch_state.epoch.remote()))
            if self._shuffle_window > 0:
                rows = window_shuffle(rows, self._shuffle_window, random.Random(f"{self._seed}:{epoch}:{path}"))
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
        rng = random.Random(f"{self._seed}:{path}")
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


class JsonLinesDatasource(FileBasedDatasource):
    """JSON Lines files (plain or gzip, local or URI), one row per non-blank line through
    ``parse(raw, path, line) -> dict``; a bad line keeps its ``error`` instead of failing the task."""

    _FILE_EXTENSIONS = TRIPLET_EXTENSIONS

    def __init__(self, paths: list[str] | str, parse: Any, schema: pa.Schema, rows_per_block: int = 1024,
                 **kwargs: Any) -> None:
        super().__init__(paths, file_extensions=TRIPLET_EXTENSIONS, **kwargs)
        self._parse, self._schema, self._rows_per_block = parse, schema, rows_per_block

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for n, raw in iter_lines(f):
            rows.append(self._parse(raw, path, n))
            if len(rows) >= self._rows_per_block:
                yield pa.Table.from_pylist(rows, schema=self._schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=self._schema)


def expand_paths(paths: list[str]) -> list[str]:
    """Expand local globs (``data/*.jsonl``); directories and URIs are listed by Ray Data itself."""
    out: list[str] = []
    for path in paths:
        if "://" not in path and any(c in path for c in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataValidationError(f"train_data: no file matches {path!r}")
            out.extend(matches)
        else:
            out.append(path)
    return out


def triplet_source(paths: list[str], rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                   seed: int = 42) -> TripletDatasource:
    """The datasource of the triplet files (lists directories and URIs; needs Ray up)."""
    return TripletDatasource(expand_paths(paths), rules, max_examples=max_examples, seed=seed)


def read_triplets(paths: list[str], rules: RowRules, max_examples: int = DEFAULT_MAX_EXAMPLES,
                  seed: int = 42) -> ray.data.Dataset:
    """A Ray Dataset of validated triplet rows (bad rows carry their ``error``)."""
    import ray.data

    return ray.data.read_datasource(triplet_source(paths, rules, max_examples=max_examples, seed=seed))


@dataclass
class DataSummary:
    """What a pass over the training data found."""

    num_rows: int = 0
    num_bad: int = 0
    first_errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.num_rows} usable rows"
        if self.num_bad:
            text += f", {self.num_bad} bad rows skipped; first: " + "; ".join(self.first_errors)
        return text


def _summarize_block(batch: pa.Table) -> pa.Table:
    errors = batch.column("error").to_pylist()
    bad = [e for e in errors if e is not None]
    return pa.table({"good": [len(errors) - len(bad)], "bad": [len(bad)], "errors": [bad[:_MAX_ERRORS_KEPT]]})


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
        import ray.data

        data = ray.data.read_datasource(data)
    parts = data.select_columns(["error"]).map_batches(_summarize_block, batch_format="pyarrow", batch_size=None)
    yield from parts.iter_rows()


def scan_triplets(data: ray.data.Dataset | TripletDatasource, skip_bad_rows: bool) -> DataSummary:
    """Count usable rows (of a dataset, or of a datasource: see :func:`_block_summaries`); without
    ``skip_bad_rows`` the first bad row is a :class:`DataValidationError`."""
    summary = DataSummary()
    for part in _block_summaries(data):
        summary.num_rows += int(part["good"])
        summary.num_bad += int(part["bad"])
        for err in part["errors"]:
            if len(summary.first_errors) < _MAX_ERRORS_KEPT:
                summary.first_errors.append(err)
    if summary.num_bad and not skip_bad_rows:
        more = f" ({summary.num_bad - 1} more bad rows)" if summary.num_bad > 1 else ""
        raise DataValidationError(
            f"bad training row: {sorted(summary.first_errors)[0]}{more}. "
            "Fix the data, or set skip_bad_rows: true to skip bad rows and count them"
        )
    if summary.num_rows == 0:
        raise DataValidationError("the training data holds no usable rows")
    return summary


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer, loaded once per process."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                        use_fast=True)
    if tok.pad_token_id is None:
        # Decoder models (last_token pooling) often ship without a pad token.
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything the tokenize step needs; picklable for Ray tasks."""

    tokenizer: str
    cache_dir: str | None
    trust_remote_code: bool
    query_max_len: int
    passage_max_len: int
    query_instruction: str | None
    query_instruction_format: str
    passage_instruction: str | None
    passage_instruction_format: str
    append_eos: bool = False

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> TokenizeSpec:
        return cls(
            tokenizer=cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code,
            query_max_len=cfg.query_max_len, passage_max_len=cfg.passage_max_len,
            query_instruction=cfg.query_instruction_for_retrieval,
            query_instruction_format=cfg.query_instruction_format,
            passage_instruction=cfg.passage_instruction_for_retrieval,
            passage_instruction_format=cfg.passage_instruction_format,
        )

    def query_text(self, query: str, prompt: str | None) -> str:
        instruction = prompt if prompt is not None else self.query_instruction
        return self.query_instruction_format.format(instruction, query) if instruction is not None else query

    def passage_text(self, passage: str) -> str:
        if self.passage_instruction is None:
            return passage
        return self.passage_instruction_format.format(self.passage_instruction, passage)


def tokenize_rows(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    """Apply instructions and tokenize every text of every row (truncated, not padded)."""
    tok = load_tokenizer(spec.tokenizer, spec.cache_dir, spec.trust_remote_code)
    queries = [spec.query_text(q, p) for q, p in zip(batch.column("query").to_pylist(),
                                                     batch.column("prompt").to_pylist(), strict=True)]
    pos = batch.column("pos").to_pylist()
    neg = batch.column("neg").to_pylist()
    flat = [spec.passage_text(t) for texts in pos for t in texts] + [spec.passage_text(t) for texts in neg for t in texts]
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


def _drop_bad(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

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
    batch = _drop_bad(batch)
    if state is None or batch.num_rows == 0:
        return batch
    import ray

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
    import ray.data

    # The driver prints its own progress (loss, groups/s); Ray Data's bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rules = RowRules.from_config(cfg)
    source = triplet_source(cfg.train_data, rules, max_examples=cfg.max_example_num_per_dataset, seed=cfg.seed)
    summary = scan_triplets(source, skip_bad_rows=cfg.skip_bad_rows)
    rows = ray.data.read_datasource(source.training_pass(cfg.shuffle_buffer_size, epoch_state))
    spec = TokenizeSpec.from_config(cfg)
    # Small tokenize tasks, their output cut into small blocks: Train's equal split hands a block out
    # only once every worker can get as many rows, so with a few large blocks the first batch
    # waits for most of the epoch's tokenization.
    ds = rows.map_batches(_usable_rows, fn_kwargs={"state": epoch_state}, batch_format="pyarrow").map_batches(
        tokenize_rows, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS
    ).repartition(target_num_rows_per_block=TOKENIZE_BATCH_ROWS)  # fused into the task: its output leaves in small blocks
    return ds, summary


def sample_group(num_pos: int, num_neg: int, group_size: int, seed: int, epoch: int, key: int) -> tuple[int, list[int]]:
    """Pick one positive and ``group_size-1`` negatives for a row, FlagEmbedding's way.

    Negatives are drawn without replacement when there are enough, otherwise from the list
    repeated ``ceil((group_size-1)/num_neg)`` times. The draw depends only on (seed, epoch, key).
    """
    rng = random.Random((seed * 1_000_003 + epoch) * 4_294_967_296 + key)
    pos_idx = rng.randrange(num_pos)
    need = group_size - 1
    if need == 0:
        return pos_idx, []
    if num_neg == 0:
        raise DataValidationError("a row without negatives needs train_group_size: 1")
    pool = list(range(num_neg))
    if num_neg < need:
        pool = pool * math.ceil(need / num_neg)
    return pos_idx, rng.sample(pool, need)


def sample_row(row: dict, group_size: int, seed: int, epoch: int) -> dict:
    """The row with only its group for ``epoch``: ``pos`` the one sampled positive, ``neg`` the
    ``group_size-1`` sampled negatives, teacher scores cut the same way (:func:`sample_group`)."""
    pos_idx, neg_idx = sample_group(len(row["pos"]), len(row["neg"] or []), group_size, seed, epoch, row["row_key"])
    out = dict(row, pos=[row["pos"][pos_idx]], neg=[row["neg"][j] for j in neg_idx])
    if row.get("pos_scores"):  # scores are optional (empty or None without them)
        out["pos_scores"] = [row["pos_scores"][pos_idx]]
    if row.get("neg_scores"):
        out["neg_scores"] = [row["neg_scores"][j] for j in neg_idx]
    return out


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


def length_grouped(batches: Iterator[dict[str, Any]], batch_size: int, seed: int,
                   pool: int = LENGTH_POOL_BATCHES) -> Iterator[dict[str, Any]]:
    """``group_by_length``: regroup the rows of every ``pool`` consecutive batches so that each batch
    holds rows of similar length (padding less), then yield those batches in a seeded random order.

    The rows still arrive shuffled (the pool is ``pool`` x ``batch_size`` rows of the shuffled stream),
    so a batch's in-batch negatives are random rows of similar length. The same rows are trained, in
    the same number of batches: only which rows share a batch changes."""
    rng = random.Random(seed)
    while True:
        taken = list(itertools.islice(batches, pool))
        if not taken:
            return
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
    :func:`sample_row`) into padded model inputs: the queries, then each row's group, positive first."""

    group_size: int
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    knowledge_distillation: bool = False

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        queries, passages, teacher = [], [], []
        for i in range(len(batch["row_key"])):
            pos, neg = batch["pos_ids"][i], batch["neg_ids"][i]
            if len(pos) != 1 or len(neg) != self.group_size - 1:
                raise ValueError(f"row {int(batch['row_key'][i])} holds {len(pos)} positive(s) and {len(neg)} "
                                 f"negative(s), not a sampled group of {self.group_size} (see sample_row)")
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
