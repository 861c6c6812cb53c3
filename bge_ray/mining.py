"""Training-data tools on Ray Data: ``bge-ray mine`` (hard negatives) and ``bge-ray score`` (teacher scores).

mine (FlagEmbedding's ``hn_mine`` names and defaults), one way, streaming over the rows:

    triplet rows (TripletDatasource, every row validated, file:line errors)
      -> candidate pool: a corpus file, or every pos/neg passage in the data; deduplicated by
         whitespace-normalised text and sorted, so the pool does not depend on read order
      -> pool embeddings: TextEncoder actors (the evaluation encoder), one (N, d) matrix in the
         object store
      -> Miner actors: embed each batch of queries, exact top-k over the pool in chunks, keep ranks
         [start, end) of ``range_for_sampling``, drop every positive (by normalised text), the query
         itself and (optionally) candidates scoring too close to the positive or above a cap, then
         sample ``negative_number`` with a per-row seed
      -> JSONL shards in ``output_dir`` (written by the Ray Data workers, streaming)

A query left with fewer candidates than ``negative_number`` keeps the ones it has and is reported;
it is never padded with random passages (FlagEmbedding's random fill can pick a positive).

score: the same rows, each with ``pos_scores``/``neg_scores`` from a teacher: a cross-encoder
(``AutoModelForSequenceClassification`` with one logit) or a bi-encoder (the embedding similarity),
batched on Ray Data actors, ready for ``knowledge_distillation: true``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data.datasource.file_datasink import BlockBasedFileDatasink

from bge_ray.config import POOLING_METHODS, REMOTE_SCHEMES, ConfigError, _check_format, knob, resolve_config
from bge_ray.data import (
    DataValidationError,
    JsonLinesDatasource,
    RowRules,
    _drop_bad,
    decode_json_line,
    scan_triplets,
    triplet_source,
)

# hn_mine / add_reranker_score flags that mean nothing here; accepted so a FlagEmbedding command moves over.
MINE_IGNORED = {
    "embedder_model_class": "the model class is read from the model's config",
    "use_fp16": "GPU encoders use bf16 (fp16 on GPUs without bf16); CPU encoders fp32",
    "devices": "Ray places one encoder actor per GPU (use_gpu) or per CPU",
    "use_gpu_for_searching": "the search runs where the miner actors run: set use_gpu",
    "search_batch_size": "the search is chunked over the pool; memory stays O(batch x chunk)",
    "cache_dir": "models load from their directory or the Hugging Face cache",
    "examples_for_task": "in-context examples are not supported; use query_instruction_for_retrieval",
    "examples_instruction_format": "in-context examples are not supported",
    "reranker_model_class": "the model class is read from the model's config",
    "normalize": "scores are the teacher's raw logits (or similarities); distillation applies its own softmax",
}


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: the identity used to keep positives out of the negatives."""
    return " ".join(text.split())


def _parse_range(value: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in str(value).split("-"))
    except ValueError:
        raise ConfigError(f"range_for_sampling must look like START-END (e.g. 10-210), got {value!r}") from None
    if start < 0 or end <= start:
        raise ConfigError(f"range_for_sampling needs 0 <= START < END, got {value!r}")
    return start, end


def _check_inputs(paths: list[str], name: str) -> None:
    if not paths:
        raise ConfigError(f"{name} is required: one or more JSONL files, folders or globs")
    import glob

    for path in paths:
        if path.startswith(REMOTE_SCHEMES) and not path.startswith("file://"):
            continue
        local = path[len("file://"):] if path.startswith("file://") else path
        if not (os.path.exists(local) or glob.glob(local)):
            raise ConfigError(f"{name}: no file or folder matches {path!r}")


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path if "://" in path else f"file://{os.path.abspath(path)}")


def _check_output(output_dir: str | None, overwrite: bool, inputs: list[str]) -> None:
    """``output_dir`` must be new or empty unless ``overwrite``, and never hold the input."""
    if not output_dir:
        raise ConfigError("output_dir is required: the folder the JSONL shards are written to")
    fs, root = _fs(output_dir)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output_dir {output_dir!r} is a file; give a folder for the shards")
    if "://" not in output_dir:
        out = os.path.abspath(output_dir)
        for path in inputs:
            p = os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
            if p == out or p.startswith(out + os.sep):
                raise ConfigError(f"output_dir {output_dir!r} holds the input {path!r}; write somewhere else")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)) and not overwrite:
        raise ConfigError(f"output_dir {output_dir!r} exists and is not empty; pass --overwrite to replace its contents")


@dataclass
class _RowJobConfig:
    """What mining and scoring share: rows in, shards out, an encoder, the cluster."""

    IGNORED: ClassVar[dict[str, str]] = MINE_IGNORED

    input_file: list[str] = knob(help="triplet JSONL files, folders, globs or URIs; 'neg' may be empty",
                                 factory=list, shown="required")
    output_dir: str | None = knob(None, "folder for the output shards and report.txt (new or empty unless "
                                  "overwrite)", shown="required")
    query_instruction_for_retrieval: str | None = knob(None, "instruction put before every query (a row's "
                                                       "'prompt' overrides it)")
    query_instruction_format_for_retrieval: str = knob("{}{}", "how instruction and query join: two {} slots")
    pooling_method: str | None = knob(None, "cls, mean or last_token", shown="the model's own")
    normalize_embeddings: bool | None = knob(None, "L2-normalise embeddings", shown="the model's own")
    embedder_query_max_length: int = knob(512, "query tokens kept by the embedder")
    embedder_passage_max_length: int = knob(512, "passage tokens kept by the embedder")
    trust_remote_code: bool = knob(False, "allow a model's own Python code to run")
    use_gpu: bool = knob(False, "one GPU per encoder actor (bf16, or fp16 where there is no bf16)")
    concurrency: int | None = knob(None, "encoder actors", shown="one per GPU, or per CPU - 1")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first one")
    overwrite: bool = knob(False, "allow a non-empty output_dir (its shards are replaced)")
    ray_address: str | None = knob(None, "cluster to join; else RAY_ADDRESS; else a local Ray", shown="local")

    def _validate_common(self, batch_field: str, extra_inputs: list[str]) -> None:
        _check_inputs(self.input_file, "input_file")
        _check_output(self.output_dir, self.overwrite, self.input_file + extra_inputs)
        _check_encoder(self.pooling_method, self.embedder_query_max_length, self.embedder_passage_max_length,
                       batch_field, getattr(self, batch_field), self.concurrency)
        _check_format("query_instruction_format_for_retrieval", self.query_instruction_format_for_retrieval)

    def _encoder_spec(self, model: str, batch_size: int, passage_instruction: str | None = None) -> Any:
        from bge_ray.evaluation import encoder_spec_for

        return encoder_spec_for(
            model, pooling=self.pooling_method, normalize=self.normalize_embeddings,
            query_instruction=self.query_instruction_for_retrieval,
            query_instruction_format=self.query_instruction_format_for_retrieval,
            passage_instruction=passage_instruction, query_max_len=self.embedder_query_max_length,
            passage_max_len=self.embedder_passage_max_length, batch_size=batch_size,
            trust_remote_code=self.trust_remote_code)


@dataclass
class MineConfig(_RowJobConfig):
    """``bge-ray mine``: FlagEmbedding's hn_mine arguments (``input_file``, ``candidate_pool``,
    ``range_for_sampling``, ``negative_number``, ``embedder_*``) plus the false-negative filters."""

    COMMAND: ClassVar[str] = "mine"

    embedder_name_or_path: str = knob("BAAI/bge-base-en-v1.5", "the model that mines")
    candidate_pool: list[str] | None = knob(None, "JSONL files to draw negatives from ('text', or BEIR 'title' + "
                                            "'text')", shown="the input's passages")
    range_for_sampling: str = knob("10-210", "ranks START-END (0-based, END excluded) to sample negatives from")
    negative_number: int = knob(15, "negatives per row")
    positive_score_ratio: float | None = knob(None, "never pick a candidate scoring above this times the row's "
                                              "lowest positive score (false-negative filter)")
    max_negative_score: float | None = knob(None, "never pick a candidate scoring above this (false-negative "
                                            "filter)")
    seed: int = knob(42, "same seed and input: same output")
    passage_instruction_for_retrieval: str | None = knob(None, "instruction put before every candidate passage")
    embedder_batch_size: int = knob(256, "texts per encoder batch")

    def validate(self) -> None:
        from bge_ray.config import resolve_model_path

        if self.candidate_pool is not None:
            _check_inputs(self.candidate_pool, "candidate_pool")
        self._validate_common("embedder_batch_size", self.candidate_pool or [])
        _parse_range(self.range_for_sampling)
        if self.negative_number < 1:
            raise ConfigError(f"negative_number must be >= 1, got {self.negative_number}")
        if self.positive_score_ratio is not None and not 0 < self.positive_score_ratio <= 1:
            raise ConfigError(f"positive_score_ratio must be in (0, 1] (e.g. 0.95) or unset, got {self.positive_score_ratio}")
        if self.max_negative_score is not None and not np.isfinite(self.max_negative_score):
            raise ConfigError(f"max_negative_score must be a finite number or unset, got {self.max_negative_score}")
        self.embedder_name_or_path = resolve_model_path(self.embedder_name_or_path)

    def encoder_spec(self) -> Any:
        return self._encoder_spec(self.embedder_name_or_path, self.embedder_batch_size,
                                  self.passage_instruction_for_retrieval)


@dataclass
class ScoreConfig(_RowJobConfig):
    """``bge-ray score``: teacher scores for every positive and negative of every row."""

    COMMAND: ClassVar[str] = "score"

    reranker_name_or_path: str | None = knob(None, "a cross-encoder teacher (one logit per pair); give this or "
                                             "embedder_name_or_path")
    embedder_name_or_path: str | None = knob(None, "a bi-encoder teacher (similarity / teacher_temperature); give "
                                             "this or reranker_name_or_path")
    reranker_max_length: int = knob(512, "tokens of query + passage the reranker reads")
    query_instruction_for_rerank: str | None = knob(None, "instruction put before every query for the reranker")
    passage_instruction_for_rerank: str | None = knob(None, "instruction put before every passage for the reranker")
    batch_size: int = knob(64, "pairs (or texts) per teacher batch")
    # raw cosines of one group lie within ~0.3, so their softmax is near uniform; dividing by the
    # student's temperature puts them on the scale of a reranker's logits
    teacher_temperature: float = knob(0.02, "a bi-encoder teacher's similarities are divided by this to make "
                                      "logits (use the temperature you train with)")

    def validate(self) -> None:
        from bge_ray.config import resolve_model_path

        self._validate_common("batch_size", [])
        if (self.reranker_name_or_path is None) == (self.embedder_name_or_path is None):
            raise ConfigError("give exactly one teacher: reranker_name_or_path (a cross-encoder) "
                              "or embedder_name_or_path (a bi-encoder)")
        if self.reranker_max_length < 4:
            raise ConfigError(f"reranker_max_length must be >= 4, got {self.reranker_max_length}")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        for name in ("reranker_name_or_path", "embedder_name_or_path"):
            if getattr(self, name):
                setattr(self, name, resolve_model_path(getattr(self, name)))

    @property
    def teacher(self) -> str:
        return self.reranker_name_or_path or self.embedder_name_or_path or ""


def _check_encoder(pooling: str | None, qlen: int, plen: int, batch_field: str, batch: int,
                   concurrency: int | None) -> None:
    if pooling is not None and pooling not in POOLING_METHODS:
        raise ConfigError(f"pooling_method must be one of {', '.join(POOLING_METHODS)} or unset (the model's own), "
                          f"got {pooling!r}")
    if min(qlen, plen) < 2:
        raise ConfigError("embedder_query_max_length and embedder_passage_max_length must be >= 2")
    if batch < 1:
        raise ConfigError(f"{batch_field} must be >= 1, got {batch}")
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1 or unset, got {concurrency}")


# ------------------------------------------------------------------------------------------------ I/O

POOL_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("error", pa.string())])


def parse_pool_line(raw: bytes, path: str, n: int) -> dict:
    """A candidate-pool line: ``{"text": ...}`` (FlagEmbedding) or a BEIR document (title + text)."""
    where = f"{path}:{n}"
    row = {"text": None, "source": where, "error": None}
    obj, row["error"] = decode_json_line(raw, where)
    if row["error"]:
        return row
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        row["error"] = f"{where}: a candidate needs a string 'text'"
        return row
    title = obj.get("title") or ""
    if not isinstance(title, str):
        row["error"] = f"{where}: 'title' must be a string"
        return row
    text = f"{title} {obj['text']}".strip()
    if not text:
        row["error"] = f"{where}: empty candidate text"
        return row
    row["text"] = text
    return row


class JsonlShardSink(BlockBasedFileDatasink):
    """Writes rows as JSON Lines shards (one per write task) and counts what it wrote.

    Keeps ``columns`` (None values left out); rows with fewer than ``want_negatives`` negatives
    are counted and a few of their sources kept for the report.
    """

    def __init__(self, path: str, columns: list[str], want_negatives: int = 0, overwrite: bool = False) -> None:
        from ray.data._internal.savemode import SaveMode

        super().__init__(path, file_format="jsonl", mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)
        self.columns, self.want_negatives = columns, want_negatives
        self.stats: dict[str, Any] = {}

    def write_block_to_file(self, block: Any, file: Any) -> None:
        lines = []
        for row in block.to_arrow().to_pylist():
            obj = {k: row[k] for k in self.columns if row.get(k) is not None}
            lines.append(json.dumps(obj, ensure_ascii=False))
        file.write(("\n".join(lines) + "\n").encode("utf-8"))

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        blocks = list(blocks)
        stats: dict[str, Any] = {"rows": 0, "short": 0, "short_examples": [], "removed_positives": 0}
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            stats["rows"] += table.num_rows
            if "removed_positives" in table.column_names:
                stats["removed_positives"] += int(pc.sum(table.column("removed_positives")).as_py() or 0)
            if self.want_negatives and "neg" in table.column_names:
                for src, neg in zip(table.column("source").to_pylist(), table.column("neg").to_pylist(), strict=True):
                    if len(neg) < self.want_negatives:
                        stats["short"] += 1
                        if len(stats["short_examples"]) < 5:
                            stats["short_examples"].append(f"{src}: {len(neg)} of {self.want_negatives}")
        super().write(blocks, ctx)
        return stats

    def on_write_complete(self, write_result: Any) -> None:
        super().on_write_complete(write_result)
        total: dict[str, Any] = {"rows": 0, "short": 0, "short_examples": [], "removed_positives": 0}
        for part in write_result.write_returns:
            if not part:
                continue
            for key in ("rows", "short", "removed_positives"):
                total[key] += part[key]
            total["short_examples"].extend(part["short_examples"])
        total["short_examples"] = sorted(total["short_examples"])[:5]
        self.stats = total


def _read_rows(paths: list[str], skip_bad_rows: bool) -> tuple[Any, Any]:
    """Validated triplet rows (``neg`` may be empty) and the scan summary; bad rows fail unless skipped."""
    import ray.data

    source = triplet_source(paths, RowRules(train_group_size=1, knowledge_distillation=False))
    summary = scan_triplets(source, skip_bad_rows)
    ds = ray.data.read_datasource(source)
    return ds.map_batches(_drop_bad, batch_format="pyarrow") if summary.num_bad else ds, summary


def _log(msg: str) -> None:
    print(f"[bge-ray] {msg}", file=sys.stderr, flush=True)


def _concurrency(requested: int | None, use_gpu: bool, streaming: bool = True) -> int:
    """Encoder actors for one stage. A ``streaming`` stage also runs read and write tasks, so on CPU
    one CPU stays free for them (actors holding every CPU stall the pipeline)."""
    import ray

    res = ray.cluster_resources()
    if use_gpu:
        return requested or max(1, int(res.get("GPU", 0)))
    cpus = int(res.get("CPU", 1))
    room = max(1, cpus - 1) if streaming else max(1, cpus)
    if requested and requested > room:
        _log(f"concurrency {requested} leaves no CPU for this stage's read/write tasks on a {cpus}-CPU cluster; "
             f"using {room}")
    return min(requested, room) if requested else room


def _write_report(output_dir: str, lines: list[str]) -> None:
    fs, root = _fs(output_dir)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/report.txt") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------------------------------ mine

@dataclass
class MineResult:
    output_dir: str
    num_rows: int
    num_bad_rows: int
    pool_size: int
    short_rows: int
    short_examples: list[str]
    removed_positives: int
    wall_s: float
    pool_embed_s: float          # embedding the candidate pool
    search_s: float              # embedding the queries, searching, sampling, writing
    queries_per_s: float         # rows / search_s
    config: MineConfig


def topk_chunked(queries: Any, pool: Any, k: int, chunk: int = 65536) -> tuple[Any, Any]:
    """Exact top-k of ``queries @ pool.T`` (torch tensors) without materialising (Q, N): (scores, indices)."""
    import torch

    best_s = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, pool.shape[0], chunk):
        scores = queries @ pool[start:start + chunk].T
        idx = torch.arange(start, start + scores.shape[1], device=queries.device).expand(scores.shape[0], -1)
        merged_s, merged_i = torch.cat([best_s, scores], 1), torch.cat([best_i, idx], 1)
        top = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(merged_i, 1, top.indices)
    return best_s, best_i


class Miner:
    """A Ray Data actor: embeds a batch of queries, searches the pool, samples negatives per row."""

    def __init__(self, spec: Any, pool_ref: Any, texts_ref: Any, start: int, end: int, number: int, seed: int,
                 ratio: float | None, cap: float | None) -> None:
        import ray
        import torch

        from bge_ray.evaluation import TextEncoder

        self.encoder = TextEncoder(spec, "query")
        pool = ray.get(pool_ref) if isinstance(pool_ref, ray.ObjectRef) else pool_ref
        self.texts = ray.get(texts_ref) if isinstance(texts_ref, ray.ObjectRef) else texts_ref
        with warnings.catch_warnings():  # the object-store array is read-only; the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            self.pool = torch.as_tensor(pool).to(self.encoder.device)
        self.start, self.end, self.number, self.seed = start, end, number, seed
        self.ratio, self.cap = ratio, cap

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pylist()
        q_np = self.encoder.embed([r["query"] for r in rows], "query", [r.get("prompt") for r in rows])
        q = torch.from_numpy(q_np).to(self.pool.device)
        k = min(self.end, self.pool.shape[0])
        scores, index = topk_chunked(q, self.pool, k)
        scores, index = scores.cpu().numpy(), index.cpu().numpy()
        pos_min = None
        if self.ratio is not None:
            flat = [p for r in rows for p in r["pos"]]
            p_emb = self.encoder.embed(flat, "passage")
            pos_min, at = [], 0
            for i, r in enumerate(rows):
                pos_min.append(float((p_emb[at:at + len(r["pos"])] @ q_np[i]).min()))
                at += len(r["pos"])
        out_neg, removed = [], []
        for i, r in enumerate(rows):
            positives = {normalize_text(p) for p in r["pos"]}
            query_norm = normalize_text(r["query"])
            candidates, n_removed = [], 0
            for rank in range(self.start, k):
                j, s = int(index[i, rank]), float(scores[i, rank])
                text_norm = normalize_text(self.texts[j])
                if text_norm in positives or text_norm == query_norm:
                    n_removed += 1
                    continue
                if pos_min is not None and s > self.ratio * pos_min[i]:
                    continue
                if self.cap is not None and s > self.cap:
                    continue
                candidates.append(j)
            if len(candidates) > self.number:
                rng = random.Random(f"{self.seed}:{r['row_key']}")
                chosen = sorted(rng.sample(range(len(candidates)), self.number))
                candidates = [candidates[c] for c in chosen]
            out_neg.append([self.texts[j] for j in candidates])
            removed.append(n_removed)
        return pa.table({
            "query": [r["query"] for r in rows], "pos": [r["pos"] for r in rows],
            "neg": pa.array(out_neg, type=pa.list_(pa.string())), "prompt": [r.get("prompt") for r in rows],
            "source": [r["source"] for r in rows], "removed_positives": pa.array(removed, type=pa.int64()),
        })


def _collect_pool(cfg: MineConfig, rows: Any) -> list[str]:
    """Unique candidate texts (first spelling of each normalised text), sorted for a stable order."""
    import ray.data

    seen: dict[str, str] = {}
    if cfg.candidate_pool:
        from bge_ray.data import expand_paths

        pool_ds = ray.data.read_datasource(JsonLinesDatasource(expand_paths(cfg.candidate_pool), parse_pool_line,
                                                               POOL_SCHEMA, rows_per_block=2048))
        for batch in pool_ds.iter_batches(batch_size=8192, batch_format="pyarrow"):
            for text, err in zip(batch.column("text").to_pylist(), batch.column("error").to_pylist(), strict=True):
                if err is not None:
                    raise DataValidationError(f"candidate_pool: {err}")
                seen.setdefault(normalize_text(text), text)
    else:
        for batch in rows.select_columns(["pos", "neg"]).iter_batches(batch_size=8192, batch_format="pyarrow"):
            for col in ("pos", "neg"):
                for texts in batch.column(col).to_pylist():
                    for text in texts:
                        seen.setdefault(normalize_text(text), text)
    return [seen[k] for k in sorted(seen)]


def _embed_pool(texts: list[str], spec: Any, use_gpu: bool, concurrency: int) -> np.ndarray:
    import ray.data

    from bge_ray.evaluation import _encode_dataset

    per_block = max(256, -(-len(texts) // (4 * concurrency)))
    tables = [pa.table({"_id": np.arange(s, min(s + per_block, len(texts))), "text": texts[s:s + per_block]})
              for s in range(0, len(texts), per_block)]
    emb: np.ndarray | None = None
    for batch in _encode_dataset(ray.data.from_arrow(tables), spec, "passage", use_gpu, concurrency).iter_batches(
            batch_size=4096, batch_format="numpy"):
        vectors = np.asarray(batch["emb"], dtype=np.float32)
        if emb is None:
            emb = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        emb[np.asarray(batch["_id"], dtype=np.int64)] = vectors
    assert emb is not None
    return emb


def mine(config: MineConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> MineResult:
    """Mine hard negatives for triplet rows; write them as JSONL shards to ``output_dir``.

    ``config``: a :class:`MineConfig`, a dict of its fields or a YAML path; or pass the fields as
    keyword arguments. Validated before Ray starts.
    """
    cfg: MineConfig = resolve_config(config if config is not None else kwargs, MineConfig)
    t0 = time.time()
    import ray

    from bge_ray.api import connect_ray

    connect_ray(cfg.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, summary = _read_rows(cfg.input_file, cfg.skip_bad_rows)
    _log(f"mine: {summary.describe()}")
    spec = cfg.encoder_spec()
    texts = _collect_pool(cfg, rows)
    if not texts:
        raise DataValidationError("the candidate pool is empty")
    start, end = _parse_range(cfg.range_for_sampling)
    if start >= len(texts):
        raise DataValidationError(f"range_for_sampling {cfg.range_for_sampling} starts past the candidate pool "
                                  f"({len(texts)} passages): lower START or give a larger candidate_pool")
    pool_actors = _concurrency(cfg.concurrency, cfg.use_gpu, streaming=False)
    _log(f"mine: embedding a pool of {len(texts)} passages with {spec.model} ({spec.pooling} pooling) "
         f"on {pool_actors} actor(s)")
    t_pool = time.time()
    pool = _embed_pool(texts, spec, cfg.use_gpu, pool_actors)
    concurrency = _concurrency(cfg.concurrency, cfg.use_gpu)
    pool_embed_s = time.time() - t_pool
    _log(f"mine: pool embedded in {pool_embed_s:.1f}s ({len(texts) / pool_embed_s:.1f} passages/s); searching and sampling")
    t_search = time.time()
    pool_ref, texts_ref = ray.put(pool), ray.put(texts)
    del pool
    mined = rows.map_batches(
        Miner, fn_constructor_kwargs=dict(spec=spec, pool_ref=pool_ref, texts_ref=texts_ref, start=start, end=end,
                                          number=cfg.negative_number, seed=cfg.seed, ratio=cfg.positive_score_ratio,
                                          cap=cfg.max_negative_score),
        batch_format="pyarrow", batch_size=max(64, spec.batch_size), compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if cfg.use_gpu else 0, num_cpus=None if cfg.use_gpu else 1)
    sink = JsonlShardSink(cfg.output_dir, ["query", "pos", "neg", "prompt"], want_negatives=cfg.negative_number,
                          overwrite=cfg.overwrite)
    mined.write_datasink(sink)
    wall, search_s = time.time() - t0, time.time() - t_search
    stats = sink.stats
    result = MineResult(output_dir=cfg.output_dir, num_rows=stats["rows"], num_bad_rows=summary.num_bad,
                        pool_size=len(texts), short_rows=stats["short"], short_examples=stats["short_examples"],
                        removed_positives=stats["removed_positives"], wall_s=wall, pool_embed_s=pool_embed_s,
                        search_s=search_s, queries_per_s=stats["rows"] / search_s if search_s > 0 else 0.0, config=cfg)
    lines = [f"bge-ray mine: {result.num_rows} rows, {cfg.negative_number} negatives each from ranks "
             f"{cfg.range_for_sampling} of a {len(texts)}-passage pool ({spec.model}, seed {cfg.seed})",
             f"positives found in the sampling range and kept out: {result.removed_positives}"]
    if summary.num_bad:
        lines.append(f"bad input rows skipped: {summary.num_bad}; first: " + "; ".join(summary.first_errors))
    if result.short_rows:
        lines.append(f"rows with fewer than {cfg.negative_number} negatives (kept, not padded): {result.short_rows}; "
                     "first: " + "; ".join(result.short_examples))
    lines.append(f"{wall:.1f}s in all: pool {pool_embed_s:.1f}s ({len(texts) / pool_embed_s:.1f} passages/s), "
                 f"queries {search_s:.1f}s ({result.queries_per_s:.1f} queries/s)")
    _write_report(cfg.output_dir, lines)
    for line in lines:
        _log(line)
    return result


# ------------------------------------------------------------------------------------------------ score

@dataclass
class ScoreResult:
    output_dir: str
    num_rows: int
    num_bad_rows: int
    teacher: str
    wall_s: float
    config: ScoreConfig


class Scorer:
    """A Ray Data actor: one teacher, scores every (query, passage) pair of a batch of rows."""

    def __init__(self, cfg: ScoreConfig) -> None:
        import torch

        from bge_ray.data import load_tokenizer

        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.reranker_name_or_path:
            from transformers import AutoModelForSequenceClassification

            self.tokenizer = load_tokenizer(cfg.reranker_name_or_path, None, cfg.trust_remote_code)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.model = AutoModelForSequenceClassification.from_pretrained(
                cfg.reranker_name_or_path, trust_remote_code=cfg.trust_remote_code, dtype=dtype, use_safetensors=None)
            if self.model.config.num_labels != 1:
                raise ConfigError(f"reranker {cfg.reranker_name_or_path} has {self.model.config.num_labels} labels; "
                                  "a cross-encoder teacher needs one relevance logit")
            self.model.to(self.device).eval()
            self.encoder = None
        else:
            from bge_ray.evaluation import TextEncoder

            spec = cfg._encoder_spec(cfg.embedder_name_or_path, cfg.batch_size)
            self.encoder = TextEncoder(spec, "query")

    def _rerank(self, queries: list[str], passages: list[str]) -> np.ndarray:
        import torch

        q_inst, p_inst = self.cfg.query_instruction_for_rerank or "", self.cfg.passage_instruction_for_rerank or ""
        pairs = [(q_inst + q, p_inst + p) for q, p in zip(queries, passages, strict=True)]
        order = np.argsort([-(len(q) + len(p)) for q, p in pairs], kind="stable")
        out = np.zeros(len(pairs), dtype=np.float64)
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                enc = self.tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], padding=True,
                                     truncation=True, max_length=self.cfg.reranker_max_length, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        queries, passages, owners = [], [], []
        for i, r in enumerate(rows):
            for p in r["pos"] + r["neg"]:
                queries.append(r["query"])
                passages.append(p)
                owners.append(i)
        if self.encoder is None:
            scores = self._rerank(queries, passages)
        else:
            q_emb = self.encoder.embed([r["query"] for r in rows], "query", [r.get("prompt") for r in rows])
            p_emb = self.encoder.embed(passages, "passage")
            sims = np.einsum("ij,ij->i", q_emb[owners], p_emb).astype(np.float64)
            scores = sims / self.cfg.teacher_temperature
        pos_scores, neg_scores, at = [], [], 0
        for r in rows:
            n_pos, n_neg = len(r["pos"]), len(r["neg"])
            pos_scores.append(scores[at:at + n_pos].tolist())
            neg_scores.append(scores[at + n_pos:at + n_pos + n_neg].tolist())
            at += n_pos + n_neg
        return pa.table({
            "query": [r["query"] for r in rows], "pos": [r["pos"] for r in rows],
            "neg": pa.array([r["neg"] for r in rows], type=pa.list_(pa.string())),
            "pos_scores": pa.array(pos_scores, type=pa.list_(pa.float64())),
            "neg_scores": pa.array(neg_scores, type=pa.list_(pa.float64())),
            "prompt": [r.get("prompt") for r in rows], "source": [r["source"] for r in rows],
        })


def score(config: ScoreConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> ScoreResult:
    """Add ``pos_scores``/``neg_scores`` from a teacher to triplet rows; write JSONL shards to ``output_dir``."""
    cfg: ScoreConfig = resolve_config(config if config is not None else kwargs, ScoreConfig)
    t0 = time.time()
    import ray

    from bge_ray.api import connect_ray

    connect_ray(cfg.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, summary = _read_rows(cfg.input_file, cfg.skip_bad_rows)
    concurrency = _concurrency(cfg.concurrency, cfg.use_gpu)
    kind = "cross-encoder" if cfg.reranker_name_or_path else "bi-encoder"
    _log(f"score: {summary.describe()}; teacher {cfg.teacher} ({kind}) on {concurrency} actor(s)")
    scored = rows.map_batches(Scorer, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow",
                              batch_size=max(16, cfg.batch_size // 4), compute=ray.data.ActorPoolStrategy(size=concurrency),
                              num_gpus=1 if cfg.use_gpu else 0, num_cpus=None if cfg.use_gpu else 1)
    sink = JsonlShardSink(cfg.output_dir, ["query", "pos", "neg", "pos_scores", "neg_scores", "prompt"],
                          overwrite=cfg.overwrite)
    scored.write_datasink(sink)
    wall = time.time() - t0
    lines = [f"bge-ray score: {sink.stats['rows']} rows scored by {cfg.teacher} ({kind}) in {wall:.1f}s"]
    if summary.num_bad:
        lines.append(f"bad input rows skipped: {summary.num_bad}; first: " + "; ".join(summary.first_errors))
    _write_report(cfg.output_dir, lines)
    for line in lines:
        _log(line)
    return ScoreResult(output_dir=cfg.output_dir, num_rows=sink.stats["rows"], num_bad_rows=summary.num_bad,
                       teacher=cfg.teacher, wall_s=wall, config=cfg)
