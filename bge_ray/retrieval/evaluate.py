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
from bge_ray.config.finetune import check_local_models, resolve_model_path
from bge_ray.console import ProgressLine, log
from bge_ray.data.collate import pad_ids
from bge_ray.data.icl import model_queries
from bge_ray.data.pairs import training_pair_ids
from bge_ray.data.text import TextSpec
from bge_ray.errors import ConfigError
from bge_ray.model.embedder import check_matryoshka_dims
from bge_ray.model.m3 import has_heads
from bge_ray.retrieval.datasets import RetrievalDataset, ValidationSet, check_corpus, load_dataset, read_corpus
from bge_ray.retrieval.encode import M3_COLUMNS, EncoderSpec, encode_dataset, encode_texts, encoder_spec_for
from bge_ray.retrieval.m3 import MODES, M3Search, encode_m3_texts
from bge_ray.retrieval.metrics import DEFAULT_KS, METRICS, evaluate_run
from bge_ray.retrieval.rerank import rerank_run, rerank_spec_for
from bge_ray.retrieval.search import TopK, truncate


def _embed_queries(dataset: RetrievalDataset, spec: EncoderSpec, use_gpu: bool, concurrency: int,
                   name: str) -> dict[str, Any]:
    """The evaluation queries' embeddings in ``eval_queries`` order: ``dense`` (Q, D) and, for a BGE-M3 spec,
    the per-query sparse and ColBERT columns."""
    queries = dataset.eval_queries
    qids = list(queries)
    q_ds = ray.data.from_items([{"_id": q, "text": queries[q]} for q in qids])
    columns = ("emb", *(M3_COLUMNS if spec.m3 else ()))
    got: dict[str, dict[str, Any]] = {c: {} for c in columns}
    with ProgressLine(f"eval {name}: queries", len(qids), "queries") as progress:
        for batch in encode_dataset(q_ds, spec, "query", use_gpu, concurrency).iter_batches(batch_size=None,
                                                                                           batch_format="numpy"):
            for c in columns:
                got[c].update(zip(batch["_id"], batch[c], strict=True))
            progress.add(len(batch["_id"]))
    reps = {c: [got[c][q] for q in qids] for c in columns if c != "emb"}
    return {"dense": torch.from_numpy(np.stack([got["emb"][q] for q in qids])), **reps}


def evaluate_model(dataset: RetrievalDataset, spec: EncoderSpec, ks: tuple[int, ...] = DEFAULT_KS,
                   use_gpu: bool = False, concurrency: int = 1, ignore_identical_ids: bool = False,
                   corpus: Any = None, corpus_size: int | None = None, dims: tuple[int, ...] = (),
                   modes: tuple[str, ...] = ("dense",), weights: tuple[float, float, float] = (1.0, 0.3, 1.0),
                   depth: int = 0, keep_runs: bool = False) -> list[dict[str, Any]]:
    """Embed, search and score one model on one data set: one result (metrics, ``mode``, ``dim``, timings)
    for the whole embeddings, then one per Matryoshka cut in ``dims`` (searched beside it, embedded once), or,
    for a BGE-M3 model, one per retrieval mode in ``modes`` (``weights``: the hybrid's dense, sparse and
    ColBERT weights). Prints progress (done / total, rate, ETA) while it embeds. ``depth``: search at least
    this deep (a reranker's top k); ``keep_runs``: each row keeps its ranking as ``run``.

    Raises:
        ValueError: a cut larger than the model's embeddings, an unknown mode.
    """
    t0 = time.time()
    corpus = corpus if corpus is not None else read_corpus(dataset)
    qids = list(dataset.eval_queries)
    name = os.path.basename(os.path.normpath(spec.model))
    spec = spec.replace(m3=tuple(modes) != ("dense",))
    q_reps = _embed_queries(dataset, spec, use_gpu, concurrency, name)
    k = max(*ks, depth) + (1 if ignore_identical_ids else 0)
    search = M3Search(q_reps, tuple(modes), weights, k) if spec.m3 else None
    cuts = (None, *dims)
    tops = [] if search is not None else [TopK(truncate(q_reps["dense"], d, spec.normalize), k=k) for d in cuts]
    p_ds = encode_dataset(corpus.select_columns(["_id", "text"]), spec, "passage", use_gpu, concurrency)
    with ProgressLine(f"eval {name}: passages embedded and searched", corpus_size, "passages") as progress:
        for batch in p_ds.iter_batches(batch_size=None, batch_format="numpy"):
            docs, ids = torch.tensor(np.asarray(batch["emb"], dtype=np.float32)), [str(x) for x in batch["_id"]]
            if search is not None:
                search.add({"dense": docs, **{c: batch[c] for c in M3_COLUMNS}}, ids)
            else:
                for d, top in zip(cuts, tops, strict=True):
                    top.add(truncate(docs, d, spec.normalize), ids)
            progress.add(len(batch["_id"]))
    elapsed = time.time() - t0
    timings = {"num_docs": progress.count, "eval_s": elapsed, "passages_per_s": progress.count / elapsed}
    full = q_reps["dense"].shape[1]
    runs = ([(mode, full, run) for mode, run in search.runs(qids).items()] if search is not None
            else [("dense", d or full, top.run(qids)) for d, top in zip(cuts, tops, strict=True)])
    return [{**evaluate_run(dataset.qrels, run, ks, ignore_identical_ids=ignore_identical_ids), "mode": mode,
             "dim": dim, **timings, **({"run": run} if keep_runs else {})} for mode, dim, run in runs]


def evaluate(models: list[str] | str, data: str, split: str = "test", ks: tuple[int, ...] = DEFAULT_KS,
             use_gpu: bool = False, concurrency: int | None = None, ignore_identical_ids: bool = False,
             output_dir: str | None = None, ray_address: str | None = None, truncate_dims: tuple[int, ...] = (),
             modes: tuple[str, ...] | None = None, weights: tuple[float, float, float] | None = None,
             reranker: str | None = None, rerank_top_k: int = 100, reranker_options: dict[str, Any] | None = None,
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
        modes: BGE-M3 retrieval modes to score (dense, sparse, colbert, hybrid), one row each; default all
            four for a model with BGE-M3's heads (``colbert_linear.pt``, ``sparse_linear.pt``), dense for others.
        weights: the hybrid's dense, sparse and ColBERT weights (FlagEmbedding's
            ``weights_for_different_modes``); default the ones the model's ensemble was trained with, else
            FlagEmbedding's training ensemble (1, 0.3, 1).
        reranker: a cross-encoder that re-scores each query's top ``rerank_top_k`` passages of each model's
            first row (dense, full size): one more row per model, mode ``rerank``.
        reranker_options: :class:`~bge_ray.retrieval.rerank.RerankSpec` fields (``max_length``,
            ``query_max_length``, ``batch_size``, instructions and formats).
        **overrides: :class:`EncoderSpec` or text fields set for every model (``pooling``,
            ``query_instruction``, ``passage_max_len``...).

    Returns:
        One row per model (and cut or mode): ``model``, ``data``, ``split``, ``pooling``, ``mode``, ``dim``, ``corpus_size``,
        the metrics (``ndcg@10``...), ``num_queries`` and timings (``eval_s``, ``passages_per_s``).

    Raises:
        DataValidationError: the data set is malformed (file and line named) or its qrels name
            unknown queries or documents.
        ConfigError: a cut is larger than a model's embeddings; a mode a model cannot score.
        ValueError: no model was given.
    """
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ValueError("give at least one model to evaluate")
    check_local_models(models + ([reranker] if reranker else []))
    rerank = rerank_spec_for(reranker, **(reranker_options or {})) if reranker else None
    if rerank is not None and rerank_top_k < 1:
        raise ConfigError(f"--rerank_top_k must be >= 1, got {rerank_top_k}")
    model_modes = {model: check_modes(model, modes, truncate_dims, weights) for model in models}
    for model in models if truncate_dims else ():
        try:
            check_matryoshka_dims(resolve_model_path(model), list(truncate_dims))
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
                                 dims=tuple(truncate_dims), modes=model_modes[model],
                                 weights=tuple(weights) if weights else spec.m3_weights,
                                 depth=rerank_top_k if rerank else 0, keep_runs=rerank is not None)
        if rerank is not None:
            t0 = time.time()
            run = rerank_run(results[0]["run"], dataset.eval_queries, corpus, rerank, rerank_top_k, use_gpu, concurrency)
            results.append({**evaluate_run(dataset.qrels, run, ks, ignore_identical_ids=ignore_identical_ids),
                            "mode": "rerank", "dim": results[0]["dim"], "reranker": reranker,
                            "rerank_top_k": rerank_top_k, "eval_s": time.time() - t0})
        rows += [{"model": model, "data": dataset.name, "split": split, "pooling": spec.pooling,
                  "corpus_size": n_docs, **{k: v for k, v in metrics.items() if k != "run"}} for metrics in results]
    if output_dir:
        write_results(rows, ks, output_dir)
    return rows


def check_modes(model: str, modes: tuple[str, ...] | None, truncate_dims: tuple[int, ...] = (),
                weights: tuple[float, ...] | None = None) -> tuple[str, ...]:
    """The retrieval modes to score ``model`` in (see :func:`evaluate`), checked before any cluster work.

    Raises:
        ConfigError: an unknown mode, sparse / ColBERT / hybrid for a model without BGE-M3's heads, modes
            beside Matryoshka cuts, or weights that are not three numbers >= 0 or weigh no hybrid.
    """
    if weights is not None and (len(weights) != 3 or min(weights) < 0 or not sum(weights)):
        raise ConfigError(f"--weights_for_different_modes takes dense, sparse and ColBERT weights >= 0, got {list(weights)}")
    if modes is None:
        modes = MODES if has_heads(resolve_model_path(model)) and not truncate_dims else ("dense",)
        _check_hybrid_weights(model, modes, weights)
        return modes
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"--modes: unknown {unknown or 'empty'}; use {', '.join(MODES)}")
    if tuple(modes) != ("dense",) and not has_heads(resolve_model_path(model)):
        raise ConfigError(f"--modes {' '.join(modes)}: {model} has no BGE-M3 heads (colbert_linear.pt and "
                          "sparse_linear.pt); it scores dense only")
    if tuple(modes) != ("dense",) and truncate_dims:
        raise ConfigError("--truncate_dim cuts dense embeddings; score BGE-M3's other modes in a separate eval")
    _check_hybrid_weights(model, modes, weights)
    return tuple(dict.fromkeys(modes))


def _check_hybrid_weights(model: str, modes: tuple[str, ...], weights: tuple[float, ...] | None) -> None:
    if weights is not None and "hybrid" not in modes:
        raise ConfigError(f"--weights_for_different_modes weighs the hybrid mode, which {model} is not scored in "
                          f"({', '.join(modes)}): drop it, or add hybrid to --modes")


def format_table(rows: list[dict[str, Any]], ks: tuple[int, ...] = DEFAULT_KS, markdown: bool = False) -> str:
    """The results as a table: one row per model (and Matryoshka cut or BGE-M3 mode, with a dim or mode
    column); nDCG, Recall and MRR at each k, MAP and P at 10."""
    cols = [f"{m}@{k}" for m in METRICS for k in ks]
    cols = [c for c in cols if c.split("@")[0] in ("ndcg", "recall", "mrr") or int(c.split("@")[1]) == 10]
    extra = [c for c in ("mode", "dim")  # shown where some model has more than one row by it
             if len({(r["model"], r.get(c)) for r in rows}) > len({r["model"] for r in rows})]
    extra += ["reranker"] if any(r.get("reranker") for r in rows) else []
    header = ["model", *extra, "queries", *cols]
    body = [[str(r["model"]), *("-" if r.get(c) is None else str(r[c]) for c in extra), str(r["num_queries"]), *(f"{r[c]:.4f}" for c in cols)]
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


def _gather_m3(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
               device: torch.device) -> dict[str, Any]:
    """:func:`encode_m3_texts` with every rank embedding an equal share; all ranks get all of it, in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part, real = _shard(texts, rank, world)
    reps = encode_m3_texts(model, tokenizer, part, max_len, batch_size, device)
    reps = {k: v[:real] for k, v in reps.items()}
    if world == 1:
        return reps
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, reps)
    return {"dense": np.concatenate([g["dense"] for g in gathered if len(g["dense"])], axis=0),
            **{k: [x for g in gathered for x in g[k]] for k in M3_COLUMNS}}


def _validate_m3(model: Any, tokenizer: Any, vset: ValidationSet, spec: EncoderSpec, device: torch.device,
                 ks: tuple[int, ...], modes: tuple[str, ...], weights: tuple[float, float, float]) -> dict[str, float]:
    """The metrics of each BGE-M3 mode, ``<metric>_<mode>`` (dense without a suffix), on rank 0."""
    qids = list(vset.dataset.eval_queries)
    queries = spec.text.format([vset.dataset.queries[q] for q in qids], "query")
    q = _gather_m3(model, tokenizer, queries, spec.text.query_max_len, spec.batch_size, device)
    d = _gather_m3(model, tokenizer, spec.text.format(vset.doc_texts, "passage"), spec.text.passage_max_len,
                   spec.batch_size, device)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    search = M3Search(q, ("dense", *modes), weights, k=max(ks))
    chunk = max(1, spec.batch_size * 4)
    for start in range(0, len(vset.doc_ids), chunk):
        search.add({k: v[start:start + chunk] for k, v in d.items()}, vset.doc_ids[start:start + chunk])
    metrics: dict[str, float] = {}
    for mode, run in search.runs(qids).items():
        scores = evaluate_run(vset.dataset.qrels, run, ks)
        metrics.update(scores if mode == "dense" else {f"{k}_{mode}": v for k, v in scores.items() if "@" in k})
    return metrics


@torch.inference_mode()
def validate(model: Any, tokenizer: Any, vset: ValidationSet, spec: EncoderSpec, device: torch.device,
             ks: tuple[int, ...] = DEFAULT_KS, dims: tuple[int, ...] = (), modes: tuple[str, ...] = (),
             weights: tuple[float, float, float] = (1.0, 0.3, 1.0)) -> dict[str, float]:
    """Retrieval metrics of the model being trained. Every worker embeds an equal share (ZeRO-3
    needs all workers in every forward); rank 0 searches and scores; all workers get the metrics.
    With Matryoshka ``dims``, the metrics at each cut follow as ``<metric>_dim<d>`` (``ndcg@10_dim256``);
    with BGE-M3 ``modes`` (sparse, colbert, hybrid; ``weights`` the hybrid's), as ``<metric>_<mode>``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    was_training = model.training
    model.eval()
    metrics: list[Any] = [None]
    if modes:
        metrics[0] = _validate_m3(model, tokenizer, vset, spec, device, ks, tuple(modes), weights)
        if was_training:
            model.train()
    else:
        qids = list(vset.dataset.eval_queries)
        queries = model_queries(tokenizer, spec.text, spec.text.format([vset.dataset.queries[q] for q in qids], "query"))
        docs = spec.text.format(vset.doc_texts, "passage")
        q_emb = _embed_shared(model, tokenizer, queries, spec.text.query_max_len, spec.batch_size, device)
        d_emb = _embed_shared(model, tokenizer, docs, spec.text.passage_max_len, spec.batch_size, device)
        if was_training:
            model.train()
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


def _score_shared(model: Any, tokenizer: Any, vset: ValidationSet, spec: TextSpec, batch_size: int,
                  device: torch.device) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Every (query, candidate) pair of ``vset`` and, on rank 0, its score: each rank scores an equal share."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    texts = dict(zip(vset.doc_ids, vset.doc_texts, strict=True))
    pairs = [(q, d) for q, docs in vset.candidates.items() for d in docs]
    part, real = _shard(pairs, rank, world)
    enc = training_pair_ids(tokenizer, spec.format([vset.dataset.queries[q] for q, _ in part], "query"),
                            spec.format([texts[d] for _, d in part], "passage"), [None] * len(part), spec)
    scores = []
    for start in range(0, len(part), batch_size):
        ids, mask = pad_ids(enc["input_ids"][start:start + batch_size], tokenizer.pad_token_id, tokenizer.padding_side)
        types = (torch.from_numpy(pad_ids(enc["token_type_ids"][start:start + batch_size], 0,
                                          tokenizer.padding_side)[0]).to(device) if "token_type_ids" in enc else None)
        scores.append(model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device), types).float().cpu())
    mine = torch.cat(scores).numpy()[:real] if scores else np.zeros(0)
    if world == 1:
        return pairs, mine
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return pairs, np.concatenate(gathered)


@torch.inference_mode()
def validate_reranker(model: Any, tokenizer: Any, vset: ValidationSet, spec: TextSpec, batch_size: int,
                      device: torch.device, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Retrieval metrics of the reranker being trained, reranking ``vset.candidates`` (pairs cut as in
    training). Every worker scores an equal share (ZeRO-3 needs all workers in every forward); rank 0
    ranks and scores; all workers get the metrics."""
    was_training = model.training
    model.eval()
    pairs, scores = _score_shared(model, tokenizer, vset, spec, batch_size, device)
    if was_training:
        model.train()
    metrics: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        run: dict[str, dict[str, float]] = {q: {} for q in vset.candidates}
        for (q, d), s in zip(pairs, scores.tolist(), strict=True):
            run[q][d] = s
        metrics[0] = evaluate_run(vset.dataset.qrels, run, ks)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]
