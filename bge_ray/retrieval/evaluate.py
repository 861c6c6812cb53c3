"""Retrieval evaluation: ``evaluate`` embeds a corpus and its queries on Ray Data (an actor pool, one
model per actor, a GPU each where there are GPUs), searches exactly in chunks and scores with
:mod:`bge_ray.retrieval.metrics`; ``validate`` measures the model being trained, on its workers."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import ray
import ray.data
import torch
import torch.distributed as dist

from bge_ray.cluster import actor_count, connect_ray
from bge_ray.config.finetune import check_local_models
from bge_ray.console import ProgressLine, log
from bge_ray.errors import ConfigError
from bge_ray.model.embedder import check_matryoshka_dims
from bge_ray.retrieval.datasets import RetrievalDataset, ValidationSet, check_corpus, load_dataset, read_corpus
from bge_ray.retrieval.encode import EncoderSpec, encode_dataset, encode_texts, encoder_spec_for
from bge_ray.retrieval.metrics import DEFAULT_KS, METRICS, evaluate_run
from bge_ray.retrieval.search import TopK, truncate


def evaluate_model(dataset: RetrievalDataset, spec: EncoderSpec, ks: tuple[int, ...] = DEFAULT_KS,
                   use_gpu: bool = False, concurrency: int = 1, ignore_identical_ids: bool = False,
                   corpus: Any = None, corpus_size: int | None = None,
                   dims: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Embed, search and score one model on one data set: one result (metrics, ``dim``, timings) for
    the whole embeddings, then one per Matryoshka cut in ``dims`` (searched beside it, embedded once).
    Prints progress (done / total, rate, ETA) while it embeds.

    Raises:
        ValueError: a cut larger than the model's embeddings.
    """
    t0 = time.time()
    corpus = corpus if corpus is not None else read_corpus(dataset)
    queries = dataset.eval_queries
    qids = list(queries)
    name = os.path.basename(os.path.normpath(spec.model))
    q_ds = ray.data.from_items([{"_id": q, "text": queries[q]} for q in qids])
    q_emb: dict[str, np.ndarray] = {}
    with ProgressLine(f"eval {name}: queries", len(qids), "queries") as progress:
        for batch in encode_dataset(q_ds, spec, "query", use_gpu, concurrency).iter_batches(batch_size=None,
                                                                                           batch_format="numpy"):
            q_emb.update(zip(batch["_id"], batch["emb"], strict=True))
            progress.add(len(batch["_id"]))
    q_all = torch.from_numpy(np.stack([q_emb[q] for q in qids]))
    cuts = (None, *dims)
    k = max(ks) + (1 if ignore_identical_ids else 0)
    tops = [TopK(truncate(q_all, d, spec.normalize), k=k) for d in cuts]
    p_ds = encode_dataset(corpus.select_columns(["_id", "text"]), spec, "passage", use_gpu, concurrency)
    with ProgressLine(f"eval {name}: passages embedded and searched", corpus_size, "passages") as progress:
        for batch in p_ds.iter_batches(batch_size=None, batch_format="numpy"):
            docs, ids = torch.tensor(np.asarray(batch["emb"], dtype=np.float32)), [str(x) for x in batch["_id"]]
            for d, top in zip(cuts, tops, strict=True):
                top.add(truncate(docs, d, spec.normalize), ids)
            progress.add(len(batch["_id"]))
    elapsed = time.time() - t0
    timings = {"num_docs": progress.count, "eval_s": elapsed, "passages_per_s": progress.count / elapsed}
    return [{**evaluate_run(dataset.qrels, top.run(qids), ks, ignore_identical_ids=ignore_identical_ids),
             "dim": d or q_all.shape[1], **timings} for d, top in zip(cuts, tops, strict=True)]


def evaluate(models: list[str] | str, data: str, split: str = "test", ks: tuple[int, ...] = DEFAULT_KS,
             use_gpu: bool = False, concurrency: int | None = None, ignore_identical_ids: bool = False,
             output_dir: str | None = None, ray_address: str | None = None, truncate_dims: tuple[int, ...] = (),
             **overrides: Any) -> list[dict[str, Any]]:
    """Evaluate one or more models on one retrieval data set.

    Args:
        models: model directories or hub ids; each is embedded the way its directory says
            (:func:`~bge_ray.retrieval.encode.encoder_spec_for`).
        data: a BEIR or FlagEmbedding evaluation folder, local or a cloud URI.
        split: the split whose queries and qrels are scored.
        ks: the cut-offs of nDCG, Recall, MRR, MAP and Precision.
        use_gpu: one GPU per encoder actor (bf16, or fp16 where there is no bf16).
        concurrency: encoder actors; default one per GPU (``use_gpu``) or per CPU of the cluster.
        ignore_identical_ids: drop a retrieved document whose id is the query's (BEIR's option).
        output_dir: where ``results.json`` and ``results.md`` go; nothing is written without it.
        ray_address: the cluster to join (else ``RAY_ADDRESS``, the cluster ``ray start`` made here, or
            a local Ray).
        truncate_dims: Matryoshka cuts: each model is also scored on its embeddings' first ``d`` values
            (normalised again where the model normalises), one more row per cut.
        **overrides: :class:`EncoderSpec` or text fields set for every model (``pooling``,
            ``query_instruction``, ``passage_max_len``...).

    Returns:
        One row per model (and cut): ``model``, ``data``, ``split``, ``pooling``, ``dim``, ``corpus_size``,
        the metrics (``ndcg@10``...), ``num_queries`` and timings (``eval_s``, ``passages_per_s``).

    Raises:
        DataValidationError: the data set is malformed (file and line named) or its qrels name
            unknown queries or documents.
        ConfigError: a cut is larger than a model's embeddings.
        ValueError: no model was given.
    """
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ValueError("give at least one model to evaluate")
    check_local_models(models)
    for model in models if truncate_dims else ():
        try:
            check_matryoshka_dims(model, list(truncate_dims))
        except ValueError as e:
            raise ConfigError(f"--truncate_dim: {e}".replace("mrl_dims ", "")) from None
    connect_ray(ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = load_dataset(data, split)
    corpus = read_corpus(dataset).materialize()  # read once, embedded once per model
    n_docs = check_corpus(corpus, dataset)
    log(f"eval: {len(dataset.eval_queries):,} queries, {n_docs:,} documents in {data} ({split})")
    if concurrency is None:
        concurrency = actor_count(None, use_gpu, streaming=False)
    rows = []
    for model in models:
        spec = encoder_spec_for(model, **overrides)
        results = evaluate_model(dataset, spec, ks, use_gpu=use_gpu, concurrency=concurrency,
                                 ignore_identical_ids=ignore_identical_ids, corpus=corpus, corpus_size=n_docs,
                                 dims=tuple(truncate_dims))
        rows += [{"model": model, "data": dataset.name, "split": split, "pooling": spec.pooling,
                  "corpus_size": n_docs, **metrics} for metrics in results]
    if output_dir:
        write_results(rows, ks, output_dir)
    return rows


def format_table(rows: list[dict[str, Any]], ks: tuple[int, ...] = DEFAULT_KS, markdown: bool = False) -> str:
    """The results as a table: one row per model (and Matryoshka cut, with a dim column); nDCG, Recall and
    MRR at each k, MAP and P at 10."""
    cols = [f"{m}@{k}" for m in METRICS for k in ks]
    cols = [c for c in cols if c.split("@")[0] in ("ndcg", "recall", "mrr") or int(c.split("@")[1]) == 10]
    cut = len({(r["model"], r.get("dim")) for r in rows}) > len({r["model"] for r in rows})  # Matryoshka rows
    header = ["model", *(["dim"] if cut else []), "queries", *cols]
    body = [[str(r["model"]), *([str(r["dim"])] if cut else []), str(r["num_queries"]), *(f"{r[c]:.4f}" for c in cols)]
            for r in rows]
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


def _shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """Rank's contiguous slice, padded (with its last item) so every rank runs the same batches."""
    per = (len(items) + world - 1) // world
    part = items[rank * per:(rank + 1) * per]
    real = len(part)
    return part + [items[-1]] * (per - real), real


def _embed_shared(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Every rank embeds an equal share of ``texts``; all ranks get all embeddings, in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part, real = _shard(texts, rank, world)
    emb = encode_texts(model, tokenizer, part, max_len, batch_size, device)[:real]
    if world == 1:
        return emb
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, emb)
    return np.concatenate([g for g in gathered if len(g)], axis=0)


@torch.inference_mode()
def validate(model: Any, tokenizer: Any, vset: ValidationSet, spec: EncoderSpec, device: torch.device,
             ks: tuple[int, ...] = DEFAULT_KS, dims: tuple[int, ...] = ()) -> dict[str, float]:
    """Retrieval metrics of the model being trained. Every worker embeds an equal share (ZeRO-3
    needs all workers in every forward); rank 0 searches and scores; all workers get the metrics.
    With Matryoshka ``dims``, the metrics at each cut follow as ``<metric>_dim<d>`` (``ndcg@10_dim256``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    was_training = model.training
    model.eval()
    qids = list(vset.dataset.eval_queries)
    queries = spec.text.format([vset.dataset.queries[q] for q in qids], "query")
    docs = spec.text.format(vset.doc_texts, "passage")
    q_emb = _embed_shared(model, tokenizer, queries, spec.text.query_max_len, spec.batch_size, device)
    d_emb = _embed_shared(model, tokenizer, docs, spec.text.passage_max_len, spec.batch_size, device)
    if was_training:
        model.train()
    metrics: list[Any] = [None]
    if rank == 0:
        metrics[0] = {}
        for dim in (None, *dims):
            top = TopK(truncate(torch.from_numpy(q_emb), dim, spec.normalize), k=max(ks))
            top.add(truncate(torch.from_numpy(d_emb), dim, spec.normalize), vset.doc_ids)
            scores = evaluate_run(vset.dataset.qrels, top.run(qids), ks)
            metrics[0].update(scores if dim is None else {f"{k}_dim{dim}": v for k, v in scores.items() if "@" in k})
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]
