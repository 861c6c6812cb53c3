"""Retrieval metrics with BEIR / trec_eval definitions: nDCG@k, Recall@k, MRR@k, MAP@k, P@k.

Inputs: ``qrels`` ``{query_id: {doc_id: relevance}}`` (graded; relevance >= 1 is relevant, as
trec_eval's default ``relevance_level``) and ``run`` ``{query_id: {doc_id: score}}``. A run is
ranked by score, ties broken by doc id in reverse order (trec_eval's rule), so the numbers equal
pytrec_eval's. Only queries present in both qrels and run are scored, as BEIR does; a query in the
qrels with no relevant document scores 0.

* nDCG@k: sum over the top k of rel / log2(rank + 1), over the same for the ideal ranking of all
  judged documents (gain = the relevance grade, as trec_eval's ``ndcg_cut``).
* Recall@k: relevant documents in the top k / all relevant documents.
* P@k: relevant documents in the top k / k.
* MAP@k: sum of precision at the rank of each relevant document in the top k / all relevant
  documents (trec_eval's ``map_cut``).
* MRR@k: 1 / rank of the first relevant document in the top k, 0 if none (BEIR's definition).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

DEFAULT_KS = (1, 3, 5, 10, 100)
METRICS = ("ndcg", "recall", "mrr", "map", "precision")


def rank_run(scores: dict[str, float], k: int | None = None) -> list[str]:
    """Doc ids by score descending, ties by doc id descending (trec_eval)."""
    ranked = sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return [doc for doc, _ in (ranked if k is None else ranked[:k])]


def query_metrics(rels: dict[str, int], ranking: list[str], ks: Iterable[int]) -> dict[str, float]:
    """All metrics for one query; ``ranking`` is its ranked doc ids."""
    ks = sorted(set(ks))
    relevant = {d for d, r in rels.items() if r >= 1}
    n_rel = len(relevant)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = ranking[:k]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if rels.get(d, 0) > 0)
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
        hits = [i for i, d in enumerate(top) if d in relevant]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / n_rel if n_rel else 0.0
        out[f"precision@{k}"] = len(hits) / k
        out[f"map@{k}"] = (sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / n_rel) if n_rel else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
    return out


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                 ks: Iterable[int] = DEFAULT_KS, ignore_identical_ids: bool = False) -> dict[str, float]:
    """Mean of each metric over the queries in both ``qrels`` and ``run``.

    ``ignore_identical_ids`` drops a retrieved document whose id equals the query's (BEIR's
    option for corpora that contain the queries).
    """
    ks = tuple(ks)
    totals: dict[str, float] = {}
    n = 0
    for qid, rels in qrels.items():
        if qid not in run:
            continue
        scores = run[qid]
        if ignore_identical_ids:
            scores = {d: s for d, s in scores.items() if d != qid}
        for name, value in query_metrics(rels, rank_run(scores, max(ks)), ks).items():
            totals[name] = totals.get(name, 0.0) + value
        n += 1
    if n == 0:
        raise ValueError("no query is in both the qrels and the run: nothing to evaluate")
    means = {name: value / n for name, value in totals.items()}
    means["num_queries"] = n
    return means
