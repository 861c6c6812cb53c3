"""bge_ray/retrieval/metrics.py against pytrec_eval on real qrels (SciFact, Cranfield; vendored in tests/data, see NOTICE)."""

from __future__ import annotations

import csv
import os
import random

import pytest

from bge_ray.retrieval.metrics import evaluate_run, query_metrics, rank_run
from tests.helpers import TEST_DATA

pytrec_eval = pytest.importorskip("pytrec_eval")

KS = (1, 3, 5, 10, 100)


def read_qrels(path):
    qrels = {}
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for qid, did, score in reader:
            qrels.setdefault(qid, {})[did] = int(score)
    return qrels


def read_doc_ids(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def synthetic_run(qrels, doc_ids, seed, depth=150):
    """A run that ranks some relevant documents high and fills with random others (with ties)."""
    rng = random.Random(seed)
    run = {}
    for qid, rels in qrels.items():
        scores = {d: round(rng.random(), 2) for d in rng.sample(doc_ids, depth)}  # rounding makes ties
        for d in rels:
            if rng.random() < 0.7:
                scores[d] = round(rng.random() + 0.3, 2)
        run[qid] = scores
    return run


def pytrec_means(qrels, run):
    measures = {"ndcg_cut." + ",".join(map(str, KS)), "recall." + ",".join(map(str, KS)),
                "P." + ",".join(map(str, KS)), "map_cut." + ",".join(map(str, KS))}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    n = len(per_query)
    out = {}
    for k in KS:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            out[f"{ours}@{k}"] = sum(v[f"{theirs}_{k}"] for v in per_query.values()) / n
    return out, per_query


@pytest.mark.parametrize("name, qrels_file", [
    ("scifact", "qrels_test.tsv"),
    ("cranfield", "qrels.tsv"),
    ("cranfield", "qrels_original_codes.tsv"),  # graded codes 1..4 and -1 (treated as not relevant)
])
def test_matches_pytrec_eval_on_real_qrels(name, qrels_file):
    qrels = read_qrels(os.path.join(TEST_DATA, name, qrels_file))
    run = synthetic_run(qrels, read_doc_ids(os.path.join(TEST_DATA, name, "corpus_ids.txt")), seed=len(qrels))
    ours = evaluate_run(qrels, run, KS)
    theirs, _ = pytrec_means(qrels, run)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["num_queries"] == len(qrels)


def test_mrr_is_first_relevant_rank():
    rels = {"a": 1, "b": 2}
    m = query_metrics(rels, ["x", "y", "b", "a"], ks=(1, 3, 10))
    assert m["mrr@1"] == 0.0 and m["mrr@3"] == pytest.approx(1 / 3) and m["mrr@10"] == pytest.approx(1 / 3)


def test_queries_without_qrels_are_left_out_and_identical_ids_can_be_ignored():
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 9.0, "d1": 5.0}, "q2": {"d1": 1.0}}
    assert evaluate_run(qrels, run, ks=(1,))["num_queries"] == 1
    assert evaluate_run(qrels, run, ks=(1,))["ndcg@1"] == 0.0
    assert evaluate_run(qrels, run, ks=(1,), ignore_identical_ids=True)["ndcg@1"] == 1.0


def test_ties_broken_by_doc_id_descending():
    assert rank_run({"a": 1.0, "c": 1.0, "b": 2.0}) == ["b", "c", "a"]


def test_nothing_to_evaluate_is_an_error():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_run({"q1": {"d": 1}}, {"q2": {"d": 1.0}})
