"""``bge-ray score``: teacher scores for every positive and negative of every triplet row, on Ray Data.

The teacher is a cross-encoder (``AutoModelForSequenceClassification`` with one logit; pairs built
and scored as FlagEmbedding's ``FlagReranker`` does, its sigmoid with ``normalize``) or a
bi-encoder (the embedding similarity divided by ``teacher_temperature``), batched on Ray Data
actors; the output is ready for ``knowledge_distillation: true``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from bge_ray.cluster import actor_count, connect_ray
from bge_ray.config.parse import resolve_config
from bge_ray.console import ProgressCounter, counter_progress, log
from bge_ray.retrieval.encode import TextEncoder
from bge_ray.retrieval.rerank import PairScorer, RerankSpec, reranker_kind
from bge_ray.tools.config import ScoreConfig
from bge_ray.tools.rows import (
    PROMPT_COLUMNS,
    JsonlShardSink,
    choose_devices,
    encoder_spec,
    prompt_columns,
    read_rows,
    write_report,
)


@dataclass
class ScoreResult:
    output_dir: str
    num_rows: int
    num_bad_rows: int
    teacher: str
    wall_s: float
    config: ScoreConfig


def teacher_spec(cfg: ScoreConfig) -> RerankSpec:
    """How the reranker teacher scores pairs: ``add_reranker_score.py``'s settings."""
    return RerankSpec(model=cfg.reranker_name_or_path, query_instruction=cfg.query_instruction_for_rerank,
                      query_instruction_format=cfg.query_instruction_format_for_rerank,
                      passage_instruction=cfg.passage_instruction_for_rerank,
                      passage_instruction_format=cfg.passage_instruction_format_for_rerank,
                      max_length=cfg.reranker_max_length, query_max_length=cfg.reranker_query_max_length,
                      batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code, prompt=cfg.prompt)


class Scorer:
    """A Ray Data actor: one teacher, scores every (query, passage) pair of a batch of rows."""

    def __init__(self, cfg: ScoreConfig, counter: Any = None) -> None:
        self.cfg, self.counter = cfg, counter
        self.reranker = self.encoder = None
        if cfg.reranker_name_or_path:
            self.reranker = PairScorer(teacher_spec(cfg))
        else:
            self.encoder = TextEncoder(encoder_spec(cfg, cfg.embedder_name_or_path, cfg.batch_size), "query")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        queries, passages, owners = [], [], []
        for i, r in enumerate(rows):
            for p in r["pos"] + r["neg"]:
                queries.append(r["query"])
                passages.append(p)
                owners.append(i)
        if self.reranker is not None:
            scores = self.reranker(queries, passages)
            if self.cfg.normalize:
                scores = 1 / (1 + np.exp(-scores))
        else:
            q_emb = self.encoder.embed([r["query"] for r in rows], "query", [r.get("prompt") for r in rows])
            p_emb = self.encoder.embed(passages, "passage")
            sims = np.einsum("ij,ij->i", q_emb[owners], p_emb).astype(np.float64)
            scores = sims / self.cfg.teacher_temperature
        if self.counter is not None:
            self.counter.add.remote(len(rows))
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
            **prompt_columns(rows), "source": [r["source"] for r in rows],
        })


def score(config: ScoreConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> ScoreResult:
    """Add ``pos_scores`` / ``neg_scores`` from a teacher to triplet rows; write JSONL shards to ``output_dir``.

    Args:
        config: a :class:`ScoreConfig`, a dict of its fields or a YAML path; or pass the fields as
            keyword arguments. Validated before Ray starts.

    Returns:
        A :class:`ScoreResult` (rows written, bad rows skipped, the teacher, wall time).

    Raises:
        ConfigError: a bad config (no teacher or two, a non-empty ``output_dir``...).
        DataValidationError: a bad input row (file and line named).
    """
    cfg: ScoreConfig = resolve_config(config if config is not None else kwargs, ScoreConfig)
    t0 = time.time()
    if cfg.reranker_name_or_path:
        reranker_kind(teacher_spec(cfg))  # a reranker bge-ray can score with, before Ray starts
    connect_ray(cfg.ray_address)
    cfg = choose_devices(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, summary = read_rows(cfg.input_file, cfg.skip_bad_rows)
    concurrency = actor_count(cfg.concurrency, cfg.use_gpu)
    kind = "cross-encoder" if cfg.reranker_name_or_path else "bi-encoder"
    log(f"score: {summary.describe()}; teacher {cfg.teacher} ({kind}) on {concurrency} actor(s)")
    counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
    scored = rows.map_batches(Scorer, fn_constructor_kwargs={"cfg": cfg, "counter": counter}, batch_format="pyarrow",
                              batch_size=max(16, cfg.batch_size // 4), compute=ray.data.ActorPoolStrategy(size=concurrency),
                              num_gpus=1 if cfg.use_gpu else 0, num_cpus=None if cfg.use_gpu else 1)
    sink = JsonlShardSink(cfg.output_dir, ["query", "pos", "neg", "pos_scores", "neg_scores", *PROMPT_COLUMNS],
                          overwrite=cfg.overwrite)
    with counter_progress("score: rows scored", summary.num_rows, "rows", counter):
        scored.write_datasink(sink)
    ray.kill(counter)
    wall = time.time() - t0
    lines = [f"bge-ray score: {sink.stats['rows']} rows scored by {cfg.teacher} ({kind}) in {wall:.1f}s"]
    if summary.num_bad:
        lines.append(f"bad input rows skipped: {summary.num_bad}; first: " + "; ".join(summary.first_errors))
    write_report(cfg, lines)
    return ScoreResult(output_dir=cfg.output_file or cfg.output_dir, num_rows=sink.stats["rows"], num_bad_rows=summary.num_bad,
                       teacher=cfg.teacher, wall_s=wall, config=cfg)
