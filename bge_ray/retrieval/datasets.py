"""Retrieval data sets: a BEIR or FlagEmbedding evaluation folder (local or a cloud URI), checked.

Layouts:

* BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` or ``qrels.tsv`` (``query-id corpus-id score`` with a header).
* FlagEmbedding: ``corpus.jsonl`` (``id``, ``title``, ``text``), ``<split>_queries.jsonl``
  (``id``, ``text``), ``<split>_qrels.jsonl`` (``qid``, ``docid``, ``relevance``).

Queries and qrels are small and held in memory; the corpus is read by Ray Data (``read_corpus``),
or, for the small validation set a fine-tune measures, into memory (``load_validation_set``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from bge_ray.data.jsonl import JsonLinesDatasource, decode_json_line, iter_lines
from bge_ray.errors import DataValidationError
from bge_ray.storage import filesystem

CORPUS_SCHEMA = pa.schema([("_id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                           ("error", pa.string())])


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


@dataclass
class RetrievalDataset:
    """Queries and qrels in memory (small); the corpus is read by Ray Data from ``corpus_path``."""

    name: str
    corpus_path: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    layout: str
    split: str

    @property
    def eval_queries(self) -> dict[str, str]:
        """The queries that have qrels (the ones BEIR scores)."""
        return {q: t for q, t in self.queries.items() if q in self.qrels}


def _load_queries(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    for n, raw in iter_lines(io.BytesIO(_read_text(fs, path).encode("utf-8"))):
        where = f"{path}:{n}"
        obj, err = decode_json_line(raw, where)
        if err:
            raise DataValidationError(err)
        qid = obj.get("_id", obj.get("id")) if isinstance(obj, dict) else None
        if qid is None:
            raise DataValidationError(f"{where}: a query needs '_id' (or 'id')")
        qid = str(qid)
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataValidationError(f"{where}: query {qid!r} has an empty or missing 'text'")
        if qid in queries:
            raise DataValidationError(f"{where}: duplicate query id {qid!r}")
        queries[qid] = text
    return queries


def _load_qrels_tsv(fs: pafs.FileSystem, path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    reader = csv.reader(io.StringIO(_read_text(fs, path)), delimiter="\t")
    for n, row in enumerate(reader, 1):
        if not row or (n == 1 and not row[-1].lstrip("-").isdigit()):
            continue  # blank line or header
        if len(row) < 3:
            raise DataValidationError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
        try:
            score = int(float(row[-1]))
        except ValueError:
            raise DataValidationError(f"{path}:{n}: score {row[-1]!r} is not a number") from None
        qrels.setdefault(row[0], {})[row[-2] if len(row) == 4 else row[1]] = score
    return qrels


def _load_qrels_jsonl(fs: pafs.FileSystem, path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for n, raw in iter_lines(io.BytesIO(_read_text(fs, path).encode("utf-8"))):
        obj, err = decode_json_line(raw, f"{path}:{n}")
        if err:
            raise DataValidationError(err)
        try:
            qrels.setdefault(str(obj["qid"]), {})[str(obj["docid"])] = int(obj["relevance"])
        except (KeyError, TypeError, ValueError):
            raise DataValidationError(f"{path}:{n}: expected {{\"qid\", \"docid\", \"relevance\"}}") from None
    return qrels


def load_dataset(path: str, split: str = "test") -> RetrievalDataset:
    """Find the layout under ``path`` and load queries and qrels (validated against each other)."""
    fs, root = filesystem(path)

    def join(*parts: str) -> str:
        return "/".join([root.rstrip("/"), *parts])

    corpus = join("corpus.jsonl")
    if not _exists(fs, corpus):
        raise DataValidationError(f"{path}: no corpus.jsonl (expected a BEIR or FlagEmbedding evaluation folder)")
    if _exists(fs, join(f"{split}_queries.jsonl")) and _exists(fs, join(f"{split}_qrels.jsonl")):
        layout, queries = "flagembedding", _load_queries(fs, join(f"{split}_queries.jsonl"))
        qrels = _load_qrels_jsonl(fs, join(f"{split}_qrels.jsonl"))
    else:
        qrels_path = next((p for p in (join("qrels", f"{split}.tsv"), join("qrels.tsv")) if _exists(fs, p)), None)
        if qrels_path is None or not _exists(fs, join("queries.jsonl")):
            raise DataValidationError(
                f"{path}: expected queries.jsonl + qrels/{split}.tsv (or qrels.tsv) (BEIR), "
                f"or {split}_queries.jsonl + {split}_qrels.jsonl (FlagEmbedding)"
            )
        layout, queries, qrels = "beir", _load_queries(fs, join("queries.jsonl")), _load_qrels_tsv(fs, qrels_path)
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise DataValidationError(f"{path}: qrels name {len(unknown)} unknown query ids, e.g. {unknown[:3]}")
    if not qrels:
        raise DataValidationError(f"{path}: the qrels for split {split!r} are empty")
    name = os.path.basename(root.rstrip("/"))
    # Ray Data reads the corpus itself, so it gets the full URI (a bare bucket path would look local).
    corpus_uri = f"{path.rstrip('/')}/corpus.jsonl" if "://" in path else corpus
    return RetrievalDataset(name=name, corpus_path=corpus_uri, queries=queries, qrels=qrels, layout=layout,
                            split=split)


def parse_corpus_line(raw: bytes, path: str, n: int) -> dict:
    where = f"{path}:{n}"
    row = {"_id": None, "text": None, "source": where, "error": None}
    obj, row["error"] = decode_json_line(raw, where)
    if row["error"]:
        return row
    did = obj.get("_id", obj.get("id")) if isinstance(obj, dict) else None
    if did is None:
        row["error"] = f"{where}: a document needs '_id' (or 'id')"
        return row
    title, text = obj.get("title") or "", obj.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str):
        row["error"] = f"{where}: 'title' and 'text' must be strings"
        return row
    joined = f"{title} {text}".strip()
    if not joined:
        row["error"] = f"{where}: document {did!r} has no title and no text"
        return row
    row["_id"], row["text"] = str(did), joined
    return row


def read_corpus(dataset: RetrievalDataset) -> Any:
    """The corpus as a Ray Dataset of ``_id``, ``text`` (title + text), ``source`` and ``error``."""
    return ray.data.read_datasource(JsonLinesDatasource(dataset.corpus_path, parse_corpus_line, CORPUS_SCHEMA))


class CorpusIdCheck:
    """Checks corpus rows as they stream past: bad rows and duplicate ids are errors (with file:line),
    and at the end so are qrels that name documents the corpus lacks."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, doc_id: str | None, error: str | None, source: str) -> None:
        if error is not None:
            raise DataValidationError(error)
        if doc_id in self.seen:
            raise DataValidationError(f"{source}: duplicate document id {doc_id!r}")
        self.seen.add(doc_id)

    def finish(self, dataset: RetrievalDataset) -> int:
        unknown = sorted({d for rels in dataset.qrels.values() for d in rels} - self.seen)
        if unknown:
            raise DataValidationError(
                f"{dataset.name}: qrels name {len(unknown)} unknown document ids, e.g. {unknown[:3]}")
        return len(self.seen)


def check_corpus(corpus: Any, dataset: RetrievalDataset) -> int:
    """One pass over the corpus ids (see :class:`CorpusIdCheck`); returns the document count."""
    check = CorpusIdCheck()
    for batch in corpus.select_columns(["_id", "error", "source"]).iter_batches(batch_size=4096,
                                                                               batch_format="pyarrow"):
        for did, err, src in zip(batch.column("_id").to_pylist(), batch.column("error").to_pylist(),
                                 batch.column("source").to_pylist(), strict=True):
            check.add(did, err, src)
    return check.finish(dataset)


@dataclass
class ValidationSet:
    """A (small) evaluation set held in memory by each training worker."""

    dataset: RetrievalDataset
    doc_ids: list[str]
    doc_texts: list[str]
    # a reranker's validation: each query's passages to rerank (an embedder's top k) and that embedder's metrics
    candidates: dict[str, list[str]] | None = None
    retriever_metrics: dict[str, float] | None = None


def load_validation_set(path: str, split: str = "test") -> ValidationSet:
    """Load and check an evaluation folder without Ray (the driver validates it before training)."""
    dataset = load_dataset(path, split)
    fs, corpus_path = filesystem(dataset.corpus_path)
    ids: list[str] = []
    texts: list[str] = []
    check = CorpusIdCheck()
    with fs.open_input_stream(corpus_path) as f:
        for n, raw in iter_lines(f):
            row = parse_corpus_line(raw, dataset.corpus_path, n)
            check.add(row["_id"], row["error"], row["source"])
            ids.append(row["_id"])
            texts.append(row["text"])
    check.finish(dataset)
    return ValidationSet(dataset, ids, texts)
