"""Retrieval evaluation at cluster scale: load a BEIR / FlagEmbedding data set, embed corpus and
queries on Ray Data (an actor pool, one model per actor, a GPU each where there are GPUs), search
exactly in chunks (never the full query x corpus matrix), and score with :mod:`bge_ray.metrics`.

Layouts (local paths or pyarrow URIs such as ``s3://bucket/scifact``):

* BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` or ``qrels.tsv`` (``query-id corpus-id score`` with a header).
* FlagEmbedding: ``corpus.jsonl`` (``id``, ``title``, ``text``), ``<split>_queries.jsonl``
  (``id``, ``text``), ``<split>_qrels.jsonl`` (``qid``, ``docid``, ``relevance``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from bge_ray.data import DataValidationError, JsonLinesDatasource, decode_json_line, iter_lines, load_tokenizer
from bge_ray.metrics import DEFAULT_KS, evaluate_run

CORPUS_SCHEMA = pa.schema([("_id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                           ("error", pa.string())])


# ------------------------------------------------------------------------------------------------ files

def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


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
    fs, root = _fs(path)

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
    import ray.data

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


# ------------------------------------------------------------------------------------------------ model

@dataclass
class EncoderSpec:
    """How to embed texts with a model: pooling, normalisation, instructions, lengths, dtype."""

    model: str
    pooling: str = "cls"
    normalize: bool = True
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction: str | None = None
    passage_instruction_format: str = "{}{}"
    query_max_len: int = 64
    passage_max_len: int = 256
    batch_size: int = 64
    dtype: str = "auto"
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)


def _cached_json(model: str, filename: str) -> dict | None:
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        if not os.path.isfile(path):
            return None
    else:
        from transformers.utils import cached_file

        path = cached_file(model, filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def encoder_spec_for(model: str, **overrides: Any) -> EncoderSpec:
    """Pooling and instructions from the model directory: ``bge_ray.json``, else the
    sentence-transformers files, else FlagEmbedding's default (cls, normalised). ``overrides``
    (non-None values) win."""
    from bge_ray.config import resolve_model_path

    path = resolve_model_path(model)
    spec = EncoderSpec(model=path)
    meta = _cached_json(path, "bge_ray.json")
    if meta:
        spec.pooling = meta["sentence_pooling_method"]
        spec.normalize = bool(meta["normalize_embeddings"])
        spec.query_instruction = meta.get("query_instruction_for_retrieval")
        spec.query_instruction_format = meta.get("query_instruction_format", "{}{}")
        spec.passage_instruction = meta.get("passage_instruction_for_retrieval")
        spec.passage_instruction_format = meta.get("passage_instruction_format", "{}{}")
    else:
        pooling_cfg = _cached_json(path, "1_Pooling/config.json")
        if pooling_cfg:
            spec.pooling = ("mean" if pooling_cfg.get("pooling_mode_mean_tokens") else
                            "last_token" if pooling_cfg.get("pooling_mode_lasttoken") else "cls")
            modules = _cached_json(path, "modules.json") or []
            spec.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        st_cfg = _cached_json(path, "config_sentence_transformers.json") or {}
        prompts = st_cfg.get("prompts") or {}
        spec.query_instruction = prompts.get("query") or None
        spec.passage_instruction = prompts.get("document") or prompts.get("passage") or None
    for key, value in overrides.items():
        if value is not None:
            setattr(spec, key, value)
    return spec


class TextEncoder:
    """A Ray Data actor: one model, embeds ``text`` batches (``kind`` = query or passage)."""

    def __init__(self, spec: EncoderSpec, kind: str) -> None:
        from bge_ray.modeling import Embedder

        self.spec, self.kind = spec, kind
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32
        if self.device.type == "cuda" and spec.dtype in ("auto", "bf16", "fp16"):
            dtype = torch.float16 if spec.dtype == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
        self.tokenizer = load_tokenizer(spec.model, None, spec.trust_remote_code)
        self.model = Embedder.from_pretrained(spec.model, pooling=spec.pooling, normalize=spec.normalize,
                                              trust_remote_code=spec.trust_remote_code, dtype=dtype)
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"_id": batch["_id"], "emb": self.embed(list(batch["text"]), self.kind)}

    def embed(self, texts: list[str], kind: str, instructions: list[str | None] | None = None) -> np.ndarray:
        """Embed ``texts`` as queries or passages; ``instructions`` (per text) override the spec's."""
        if instructions is None:
            instructions = [None] * len(texts)
        formatted = [self._format(t, kind, inst) for t, inst in zip(texts, instructions, strict=True)]
        max_len = self.spec.query_max_len if kind == "query" else self.spec.passage_max_len
        return encode_texts(self.model, self.tokenizer, formatted, max_len, self.spec.batch_size, self.device)

    def _format(self, text: str, kind: str, instruction: str | None = None) -> str:
        if kind == "query":
            inst, fmt = instruction or self.spec.query_instruction, self.spec.query_instruction_format
        else:
            inst, fmt = instruction or self.spec.passage_instruction, self.spec.passage_instruction_format
        return fmt.format(inst, text) if inst is not None else text


@torch.inference_mode()
def encode_texts(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Embed texts in length-sorted sub-batches (less padding); float32 numpy in input order."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    ids = enc["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        emb = model.encode(padded["input_ids"].to(device), padded["attention_mask"].to(device)).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ search

class TopK:
    """Exact top-k over a stream of corpus chunks: keeps (Q, k) scores and ids, never (Q, N)."""

    def __init__(self, queries: torch.Tensor, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = torch.full((queries.shape[0], 0), float("-inf"))
        self.ids: list[str] = []
        self.index = torch.zeros((queries.shape[0], 0), dtype=torch.long)

    def add(self, doc_ids: list[str], doc_emb: torch.Tensor) -> None:
        scores = self.queries @ doc_emb.T
        base = len(self.ids)
        self.ids.extend(doc_ids)
        merged = torch.cat([self.scores, scores], dim=1)
        index = torch.cat([self.index, torch.arange(base, base + len(doc_ids)).expand(scores.shape[0], -1)], dim=1)
        top = torch.topk(merged, min(self.k, merged.shape[1]), dim=1)
        self.scores, self.index = top.values, torch.gather(index, 1, top.indices)
        # keep only the ids still referenced, so memory stays O(Q*k) however large the corpus
        if len(self.ids) > 4 * self.k * max(1, self.queries.shape[0]):
            self._compact()

    def _compact(self) -> None:
        used = torch.unique(self.index)
        remap = torch.full((len(self.ids),), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        self.ids = [self.ids[i] for i in used.tolist()]
        self.index = remap[self.index]

    def run(self, query_ids: list[str]) -> dict[str, dict[str, float]]:
        return {qid: {self.ids[j]: float(s) for j, s in zip(self.index[i].tolist(), self.scores[i].tolist(), strict=True)}
                for i, qid in enumerate(query_ids)}


# ------------------------------------------------------------------------------------------------ evaluate

def _encode_dataset(ds: Any, spec: EncoderSpec, kind: str, use_gpu: bool, concurrency: int) -> Any:
    import ray.data

    return ds.map_batches(TextEncoder, fn_constructor_kwargs={"spec": spec, "kind": kind}, batch_format="numpy",
                          batch_size=max(spec.batch_size * 4, 256), compute=ray.data.ActorPoolStrategy(size=concurrency),
                          num_gpus=1 if use_gpu else 0, num_cpus=1 if not use_gpu else None)


def evaluate_model(dataset: RetrievalDataset, spec: EncoderSpec, ks: tuple[int, ...] = DEFAULT_KS,
                   use_gpu: bool = False, concurrency: int = 1, ignore_identical_ids: bool = False,
                   corpus: Any = None) -> dict[str, Any]:
    """Embed, search and score one model on one data set. Returns metrics plus timings."""
    import time

    import ray.data

    t0 = time.time()
    corpus = corpus if corpus is not None else read_corpus(dataset)
    queries = dataset.eval_queries
    qids = list(queries)
    q_ds = ray.data.from_items([{"_id": q, "text": queries[q]} for q in qids])
    q_emb = {row_id: emb for batch in _encode_dataset(q_ds, spec, "query", use_gpu, concurrency).iter_batches(
        batch_size=1024, batch_format="numpy") for row_id, emb in zip(batch["_id"], batch["emb"], strict=True)}
    topk = TopK(torch.from_numpy(np.stack([q_emb[q] for q in qids])), k=max(ks) + (1 if ignore_identical_ids else 0))
    n_docs = 0
    p_ds = _encode_dataset(corpus.select_columns(["_id", "text"]), spec, "passage", use_gpu, concurrency)
    for batch in p_ds.iter_batches(batch_size=4096, batch_format="numpy"):
        topk.add([str(x) for x in batch["_id"]], torch.tensor(np.asarray(batch["emb"], dtype=np.float32)))
        n_docs += len(batch["_id"])
    elapsed = time.time() - t0
    metrics = evaluate_run(dataset.qrels, topk.run(qids), ks, ignore_identical_ids=ignore_identical_ids)
    metrics.update({"num_docs": n_docs, "eval_s": elapsed, "passages_per_s": n_docs / elapsed})
    return metrics


def evaluate(models: list[str] | str, data: str, split: str = "test", ks: tuple[int, ...] = DEFAULT_KS,
             use_gpu: bool = False, concurrency: int | None = None, ignore_identical_ids: bool = False,
             output_dir: str | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """Evaluate one or more models on one data set; one result row per model.

    ``overrides`` set :class:`EncoderSpec` fields for every model (``pooling``, ``query_instruction``,
    ``passage_max_len``, ...); otherwise each model's own directory says how to embed. With
    ``output_dir``, ``results.json`` and ``results.md`` are written there.
    """
    import ray
    import ray.data

    if isinstance(models, str):
        models = [models]
    if not models:
        raise ValueError("give at least one model to evaluate")
    from bge_ray.api import connect_ray

    connect_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = load_dataset(data, split)
    corpus = read_corpus(dataset).materialize()  # read once, embedded once per model
    n_docs = check_corpus(corpus, dataset)
    if concurrency is None:
        resources = ray.cluster_resources()
        concurrency = max(1, int(resources.get("GPU", 0))) if use_gpu else max(1, int(resources.get("CPU", 1)))
    rows = []
    for model in models:
        spec = encoder_spec_for(model, **overrides)
        metrics = evaluate_model(dataset, spec, ks, use_gpu=use_gpu, concurrency=concurrency,
                                 ignore_identical_ids=ignore_identical_ids, corpus=corpus)
        rows.append({"model": model, "data": dataset.name, "split": split, "pooling": spec.pooling,
                     "corpus_size": n_docs, **metrics})
    if output_dir:
        write_results(rows, ks, output_dir)
    return rows


def format_table(rows: list[dict[str, Any]], ks: tuple[int, ...] = DEFAULT_KS, markdown: bool = False) -> str:
    """The results as a table: one row per model, nDCG/Recall/MRR/MAP/P at each k."""
    cols = [f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "map", "precision") for k in ks]
    cols = [c for c in cols if c.split("@")[0] in ("ndcg", "recall", "mrr") or int(c.split("@")[1]) == 10]
    header = ["model", "queries", *cols]
    body = [[str(r["model"]), str(r["num_queries"]), *(f"{r[c]:.4f}" for c in cols)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*b) for b in body)])


def write_results(rows: list[dict[str, Any]], ks: tuple[int, ...], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(format_table(rows, ks, markdown=True) + "\n")


# ------------------------------------------------------------------------------------------------ during training

@dataclass
class ValidationSet:
    """A (small) evaluation set held in memory by each training worker."""

    dataset: RetrievalDataset
    doc_ids: list[str]
    doc_texts: list[str]


def load_validation_set(path: str, split: str = "test") -> ValidationSet:
    """Load and check an evaluation folder without Ray (the driver validates it before training)."""
    dataset = load_dataset(path, split)
    fs, corpus_path = _fs(dataset.corpus_path)
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


def _shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """Rank's contiguous slice, padded (with its last item) so every rank runs the same batches."""
    per = (len(items) + world - 1) // world
    part = items[rank * per:(rank + 1) * per]
    real = len(part)
    return part + [items[-1]] * (per - real), real


@torch.inference_mode()
def validate(model: Any, tokenizer: Any, vset: ValidationSet, spec: EncoderSpec, device: torch.device,
             ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Retrieval metrics of the model being trained. Every worker embeds an equal share (ZeRO-3
    needs all workers in every forward); rank 0 searches and scores; all workers get the metrics."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    qids = list(vset.dataset.eval_queries)
    fmt_q = [spec.query_instruction_format.format(spec.query_instruction, vset.dataset.queries[q])
             if spec.query_instruction is not None else vset.dataset.queries[q] for q in qids]
    fmt_d = [spec.passage_instruction_format.format(spec.passage_instruction, t)
             if spec.passage_instruction is not None else t for t in vset.doc_texts]
    out = []
    for texts, max_len in ((fmt_q, spec.query_max_len), (fmt_d, spec.passage_max_len)):
        part, real = _shard(texts, rank, world)
        emb = encode_texts(model, tokenizer, part, max_len, spec.batch_size, device)[:real]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, emb)
            emb = np.concatenate([g for g in gathered if len(g)], axis=0)
        out.append(emb)
    if was_training:
        model.train()
    metrics: list[Any] = [None]
    if rank == 0:
        top = TopK(torch.from_numpy(out[0]), k=max(ks))
        top.add(vset.doc_ids, torch.from_numpy(out[1]))
        metrics[0] = evaluate_run(vset.dataset.qrels, top.run(qids), ks)
    if world > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]
