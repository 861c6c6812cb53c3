"""``bge-ray mine``: hard negatives for triplet rows, on Ray Data (FlagEmbedding's ``hn_mine`` names
and defaults). One way, streaming over the rows:

    triplet rows (every row validated, file:line errors)
      -> candidate pool: a corpus file, or every pos/neg passage in the data; deduplicated by
         whitespace-normalised text and sorted, so the pool does not depend on read order
      -> pool embeddings: encoder actors, one (N, d) matrix in the object store
      -> Miner actors: embed each batch of queries, exact top-k over the pool in chunks, keep ranks
         [start, end) of ``range_for_sampling``, drop every positive (by normalised text), the query
         itself and (optionally) candidates scoring too close to the positive or above a cap, then
         sample ``negative_number`` with a per-row seed
      -> JSONL shards in ``output_dir`` (written by the Ray Data workers, streaming)

A query left with fewer candidates than ``negative_number`` keeps the ones it has and is reported;
it is never padded with random passages (FlagEmbedding's random fill can pick a positive).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from bge_ray.cluster import actor_count, connect_ray
from bge_ray.config.parse import resolve_config
from bge_ray.console import ProgressCounter, ProgressLine, counter_progress, log
from bge_ray.data.jsonl import JsonLinesDatasource, decode_json_line, expand_paths
from bge_ray.errors import DataValidationError
from bge_ray.retrieval.encode import EncoderSpec, TextEncoder, encode_dataset
from bge_ray.retrieval.search import search
from bge_ray.seeds import negatives_rng
from bge_ray.tools.config import MineConfig, parse_range
from bge_ray.tools.rows import (
    PROMPT_COLUMNS,
    JsonlShardSink,
    choose_devices,
    encoder_spec,
    prompt_columns,
    read_rows,
    write_report,
)

POOL_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("error", pa.string())])


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: the identity used to keep positives out of the negatives."""
    return " ".join(text.split())


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


class Miner:
    """A Ray Data actor: embeds a batch of queries, searches the pool, samples negatives per row."""

    def __init__(self, spec: Any, pool_ref: Any, texts_ref: Any, start: int, end: int, number: int, seed: int,
                 ratio: float | None, cap: float | None, counter: Any = None) -> None:
        self.encoder = TextEncoder(spec, "query")
        pool = ray.get(pool_ref) if isinstance(pool_ref, ray.ObjectRef) else pool_ref
        self.texts = ray.get(texts_ref) if isinstance(texts_ref, ray.ObjectRef) else texts_ref
        with warnings.catch_warnings():  # the object-store array is read-only; the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            self.pool = torch.as_tensor(pool).to(self.encoder.device)
        self.start, self.end, self.number, self.seed = start, end, number, seed
        self.ratio, self.cap, self.counter = ratio, cap, counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        q_np = self.encoder.embed([r["query"] for r in rows], "query", [r.get("prompt") for r in rows])
        q = torch.from_numpy(q_np).to(self.pool.device)
        k = min(self.end, self.pool.shape[0])
        scores, index = search(q, self.pool, k)
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
                rng = negatives_rng(self.seed, r["row_key"])
                chosen = sorted(rng.sample(range(len(candidates)), self.number))
                candidates = [candidates[c] for c in chosen]
            out_neg.append([self.texts[j] for j in candidates])
            removed.append(n_removed)
        if self.counter is not None:
            self.counter.add.remote(len(rows))
        return pa.table({
            "query": [r["query"] for r in rows], "pos": [r["pos"] for r in rows],
            "neg": pa.array(out_neg, type=pa.list_(pa.string())), **prompt_columns(rows),
            "source": [r["source"] for r in rows], "removed_positives": pa.array(removed, type=pa.int64()),
        })


def _collect_pool(cfg: MineConfig, rows: Any) -> list[str]:
    """Unique candidate texts (first spelling of each normalised text), sorted for a stable order."""
    seen: dict[str, str] = {}
    if cfg.candidate_pool:
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


def _embed_pool(texts: list[str], spec: EncoderSpec, use_gpu: bool, concurrency: int) -> np.ndarray:
    per_block = max(256, -(-len(texts) // (4 * concurrency)))
    tables = [pa.table({"_id": np.arange(s, min(s + per_block, len(texts))), "text": texts[s:s + per_block]})
              for s in range(0, len(texts), per_block)]
    emb: np.ndarray | None = None
    with ProgressLine("mine: candidate pool embedded", len(texts), "passages") as progress:
        for batch in encode_dataset(ray.data.from_arrow(tables), spec, "passage", use_gpu, concurrency).iter_batches(
                batch_size=None, batch_format="numpy"):
            vectors = np.asarray(batch["emb"], dtype=np.float32)
            if emb is None:
                emb = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            emb[np.asarray(batch["_id"], dtype=np.int64)] = vectors
            progress.add(len(vectors))
    assert emb is not None
    return emb


def mine(config: MineConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> MineResult:
    """Mine hard negatives for triplet rows and write them as JSONL shards to ``output_dir``.

    Args:
        config: a :class:`MineConfig`, a dict of its fields or a YAML path; or pass the fields as
            keyword arguments. Validated before Ray starts.

    Returns:
        A :class:`MineResult`: rows written, the pool's size, rows left short of negatives,
        positives kept out of the sampling range, timings. ``report.txt`` in ``output_dir`` says the same.

    Raises:
        ConfigError: a bad config, or an ``output_dir`` that is not empty (without ``overwrite``).
        DataValidationError: a bad input row or candidate (file and line named), an empty pool, or a
            sampling range that starts past the pool.
    """
    cfg: MineConfig = resolve_config(config if config is not None else kwargs, MineConfig)
    t0 = time.time()
    connect_ray(cfg.ray_address)
    cfg = choose_devices(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, summary = read_rows(cfg.input_file, cfg.skip_bad_rows)
    log(f"mine: {summary.describe()}")
    spec = encoder_spec(cfg, cfg.embedder_name_or_path, cfg.embedder_batch_size, cfg.passage_instruction_for_retrieval)
    texts = _collect_pool(cfg, rows)
    start, end = parse_range(cfg.range_for_sampling)
    if not texts:
        raise DataValidationError("the candidate pool is empty")
    if start >= len(texts):
        raise DataValidationError(f"range_for_sampling {cfg.range_for_sampling} starts past the candidate pool "
                                  f"({len(texts)} passages): lower START or give a larger candidate_pool")
    pool_actors = actor_count(cfg.concurrency, cfg.use_gpu, streaming=False)
    log(f"mine: embedding a pool of {len(texts)} passages with {spec.model} ({spec.pooling} pooling) "
        f"on {pool_actors} actor(s)")
    t_pool = time.time()
    pool_ref = ray.put(_embed_pool(texts, spec, cfg.use_gpu, pool_actors))  # the driver keeps no copy
    pool_embed_s = time.time() - t_pool
    log(f"mine: pool embedded in {pool_embed_s:.1f}s ({len(texts) / pool_embed_s:.1f} passages/s); searching and sampling")
    t_search = time.time()
    stats = _mine_rows(cfg, rows, spec, pool_ref, ray.put(texts), start, end, summary.num_rows)
    search_s = time.time() - t_search
    result = MineResult(output_dir=cfg.output_file or cfg.output_dir, num_rows=stats["rows"], num_bad_rows=summary.num_bad,
                        pool_size=len(texts), short_rows=stats["short"], short_examples=stats["short_examples"],
                        removed_positives=stats["removed_positives"], wall_s=time.time() - t0, pool_embed_s=pool_embed_s,
                        search_s=search_s, queries_per_s=stats["rows"] / search_s if search_s > 0 else 0.0, config=cfg)
    write_report(cfg, _report_lines(result, summary, spec))
    return result


def _mine_rows(cfg: MineConfig, rows: Any, spec: EncoderSpec, pool_ref: Any, texts_ref: Any, start: int,
               end: int, total: int) -> dict[str, Any]:
    """Every row through the Miner actors into the output shards; the sink's counts."""
    concurrency = actor_count(cfg.concurrency, cfg.use_gpu)
    counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
    mined = rows.map_batches(
        Miner, fn_constructor_kwargs=dict(spec=spec, pool_ref=pool_ref, texts_ref=texts_ref, start=start, end=end,
                                          number=cfg.negative_number, seed=cfg.seed, ratio=cfg.positive_score_ratio,
                                          cap=cfg.max_negative_score, counter=counter),
        batch_format="pyarrow", batch_size=max(64, spec.batch_size), compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if cfg.use_gpu else 0, num_cpus=None if cfg.use_gpu else 1)
    sink = JsonlShardSink(cfg.output_dir, ["query", "pos", "neg", *PROMPT_COLUMNS], want_negatives=cfg.negative_number,
                          overwrite=cfg.overwrite)
    with counter_progress("mine: queries searched and sampled", total, "rows", counter):
        mined.write_datasink(sink)
    ray.kill(counter)
    return sink.stats


def _report_lines(result: MineResult, summary: Any, spec: EncoderSpec) -> list[str]:
    cfg = result.config
    lines = [f"bge-ray mine: {result.num_rows} rows, {cfg.negative_number} negatives each from ranks "
             f"{cfg.range_for_sampling} of a {result.pool_size}-passage pool ({spec.model}, seed {cfg.seed})",
             f"positives found in the sampling range and kept out: {result.removed_positives}"]
    if summary.num_bad:
        lines.append(f"bad input rows skipped: {summary.num_bad}; first: " + "; ".join(summary.first_errors))
    if result.short_rows:
        lines.append(f"rows with fewer than {cfg.negative_number} negatives (kept, not padded): {result.short_rows}; "
                     "first: " + "; ".join(result.short_examples))
    lines.append(f"{result.wall_s:.1f}s in all: pool {result.pool_embed_s:.1f}s "
                 f"({result.pool_size / result.pool_embed_s:.1f} passages/s), queries {result.search_s:.1f}s "
                 f"({result.queries_per_s:.1f} queries/s)")
    return lines
