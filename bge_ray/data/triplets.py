"""A training row: what makes it valid, its stable key, and the group it trains with in an epoch.

A row is ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` with optional ``pos_scores``,
``neg_scores`` (teacher scores, same lengths as ``pos``/``neg``) and ``prompt`` (a query
instruction for this row that overrides ``query_instruction_for_retrieval``), ``type`` and ``category``
(FlagEmbedding's task type; a clustering row's label, its in-context example's answer); a reranker's rows may
carry ``query_prompt`` / ``passage_prompt`` (its instructions for this row, FlagEmbedding's reranker names).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from bge_ray.data.jsonl import LineTooLong, decode_json_line
from bge_ray.errors import DataValidationError
from bge_ray.seeds import row_group_rng

MAX_TEXTS_PER_ROW = 10_000
MAX_ERRORS_KEPT = 5

ROW_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("pos", pa.list_(pa.string())),
        ("neg", pa.list_(pa.string())),
        ("pos_scores", pa.list_(pa.float64())),
        ("neg_scores", pa.list_(pa.float64())),
        ("prompt", pa.string()),
        ("query_prompt", pa.string()),
        ("passage_prompt", pa.string()),
        ("type", pa.string()),
        ("category", pa.string()),
        ("batch_size", pa.int64()),
        ("train_group_size", pa.int64()),
        ("source", pa.string()),
        ("row_key", pa.int64()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class RowRules:
    """What a valid row must satisfy, from the config."""

    train_group_size: int = 8
    knowledge_distillation: bool = False



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
    for key, kind in (("prompt", str), ("query_prompt", str), ("passage_prompt", str), ("type", str), ("category", str),
                      ("batch_size", int), ("train_group_size", int)):
        value = obj.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"'{key}' must be {'a string' if kind is str else 'an integer'}, got {type(value).__name__}"
        if kind is int and value is not None and value < 1:
            return f"'{key}' must be >= 1, got {value}"
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
           "query_prompt": None, "passage_prompt": None, "type": None, "category": None, "batch_size": None,
           "train_group_size": None, "source": source, "row_key": row_key(path, line), "error": None}
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
    for key in ("prompt", "query_prompt", "passage_prompt", "type", "category", "batch_size", "train_group_size"):
        out[key] = obj.get(key)
    return out


def sample_group(num_pos: int, num_neg: int, group_size: int, seed: int, epoch: int, key: int) -> tuple[int, list[int]]:
    """Pick one positive and ``group_size-1`` negatives for a row, FlagEmbedding's way.

    Negatives are drawn without replacement when there are enough, otherwise from the list
    repeated ``ceil((group_size-1)/num_neg)`` times. The draw depends only on (seed, epoch, key).
    """
    rng = row_group_rng(seed, epoch, key)
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


@dataclass
class DataSummary:
    """What a pass over the training data found."""

    num_rows: int = 0
    num_bad: int = 0
    first_errors: list[str] = field(default_factory=list)
    rows_per_file: dict[str, int] = field(default_factory=dict)  # usable rows of each file read
    empty_files: list[str] = field(default_factory=list)  # files with no usable row

    def describe(self) -> str:
        text = f"{self.num_rows} usable rows"
        if len(self.rows_per_file) > 1:
            text += f" in {len(self.rows_per_file)} files"
        if self.num_bad:
            text += f", {self.num_bad} bad rows skipped; first: " + "; ".join(self.first_errors)
        if self.empty_files:
            text += f"; no usable row in {', '.join(self.empty_files)}"
        return text
