"""bge-ray mine / score on real Ray Data with tiny real models: checked against an in-process reference."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bge_ray.data.read import read_triplets, scan_triplets
from bge_ray.data.triplets import RowRules
from bge_ray.errors import ConfigError, DataValidationError
from bge_ray.model.embedder import Embedder
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.encode import encode_texts
from bge_ray.tools.mine import mine, normalize_text
from bge_ray.tools.score import score
from tests.flagembedding_compat import import_flag_model
from tests.helpers import FE_EXAMPLES, REPO

START, END, NUMBER = 3, 40, 6


def read_rows(folder: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f)
    return sorted(rows, key=lambda r: r["query"])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """FlagEmbedding's toy triplets as (query, pos) pairs with their passages as the candidate pool,
    plus a trap: row 0's positive, re-spaced, comes first in the pool (so the pool keeps that spelling)."""
    with open(FE_EXAMPLES, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:30]
    trap = "  " + rows[0]["pos"][0].replace(" ", "   ", 3) + "\n"
    d = tmp_path_factory.mktemp("pairs")
    pairs, pool = d / "pairs.jsonl", d / "pool.jsonl"
    pairs.write_text("".join(json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n" for r in rows))
    texts = [trap] + [t for r in rows for t in r["pos"] + r["neg"]]  # the pool keeps the trap's spelling
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(pairs), str(pool), rows


def reference(model_dir: str, queries: list[str], texts: list[str]) -> np.ndarray:
    model = Embedder.from_pretrained(model_dir, pooling="mean", normalize=True).eval()
    tok = load_tokenizer(model_dir)
    cpu = torch.device("cpu")
    return encode_texts(model, tok, queries, 64, 16, cpu) @ encode_texts(model, tok, texts, 64, 16, cpu).T


def mine_args(tiny_model, pairs, pool, out, **extra):
    args = dict(input_file=[pairs], candidate_pool=[pool], output_dir=str(out), embedder_name_or_path=tiny_model,
                pooling_method="mean", range_for_sampling=f"{START}-{END}", negative_number=NUMBER,
                embedder_query_max_length=64, embedder_passage_max_length=64, concurrency=1)
    return {**args, **extra}


@pytest.fixture(scope="module")
def mined(ray_cluster, tiny_model, pairs_file, tmp_path_factory):
    pairs, pool, _ = pairs_file
    out = tmp_path_factory.mktemp("mined") / "out"
    result = mine(mine_args(tiny_model, pairs, pool, out))
    return result, read_rows(str(out))


def test_mined_negatives_are_ranked_in_range_and_never_positive(mined, pairs_file, tiny_model):
    result, rows = mined
    _, pool_path, src = pairs_file
    with open(pool_path, encoding="utf-8") as f:
        pool = sorted({normalize_text(json.loads(line)["text"]) for line in f})
    assert result.num_rows == len(rows) == len(src) and result.pool_size == len(pool)
    assert result.removed_positives >= 1  # every row's own positive ranks high in a pool holding it
    scores = reference(tiny_model, [r["query"] for r in rows], pool)
    for i, row in enumerate(rows):
        positives = {normalize_text(p) for p in row["pos"]}
        assert len(row["neg"]) == NUMBER
        assert len(set(row["neg"])) == NUMBER
        for neg in row["neg"]:
            assert normalize_text(neg) not in positives
            s = scores[i, pool.index(normalize_text(neg))]
            # rank = how many pool passages score higher (a 1e-4 band absorbs batch-shape rounding)
            assert int((scores[i] > s + 1e-4).sum()) < END
            assert int((scores[i] > s - 1e-4).sum()) >= START
    trap_row = next(r for r in rows if r["query"] == src[0]["query"])
    assert all(normalize_text(n) != normalize_text(src[0]["pos"][0]) for n in trap_row["neg"])


def test_mined_output_is_valid_training_data(ray_cluster, mined):
    result, _ = mined
    summary = scan_triplets(read_triplets([result.output_dir], RowRules(train_group_size=NUMBER + 1)), skip_bad_rows=False)
    assert summary.num_rows == result.num_rows and summary.num_bad == 0
    report = open(os.path.join(result.output_dir, "report.txt"), encoding="utf-8").read()
    assert f"{result.num_rows} rows" in report


def test_mining_is_deterministic_under_a_seed(ray_cluster, mined, tiny_model, pairs_file, tmp_path):
    pairs, pool, _ = pairs_file
    _, first = mined
    mine(mine_args(tiny_model, pairs, pool, tmp_path / "again", concurrency=2))
    assert read_rows(str(tmp_path / "again")) == first  # whatever the number of encoder actors
    mine(mine_args(tiny_model, pairs, pool, tmp_path / "seed7", seed=7))
    other = read_rows(str(tmp_path / "seed7"))
    assert [r["query"] for r in other] == [r["query"] for r in first]
    assert any(a["neg"] != b["neg"] for a, b in zip(other, first, strict=True))


def test_false_negative_filters_and_short_rows_are_reported(ray_cluster, tiny_model, pairs_file, mined, tmp_path):
    pairs, pool, _ = pairs_file
    _, unfiltered = mined
    queries = [r["query"] for r in unfiltered]
    with open(pool, encoding="utf-8") as f:
        pool_texts = sorted({normalize_text(json.loads(line)["text"]) for line in f})
    top = np.sort(reference(tiny_model, queries, pool_texts), axis=1)[:, ::-1]
    cap = float(np.median(top[:, START + NUMBER]))  # cuts into the sampling range of about half the queries
    result = mine(mine_args(tiny_model, pairs, pool, tmp_path / "f", positive_score_ratio=1.0, max_negative_score=cap))
    rows = read_rows(str(tmp_path / "f"))
    assert [r["query"] for r in rows] == queries
    assert sum(len(r["neg"]) for r in rows) > 0
    assert [r["neg"] for r in rows] != [r["neg"] for r in unfiltered]
    for i, row in enumerate(rows):
        if not row["neg"]:
            continue
        neg_scores = reference(tiny_model, [queries[i]], row["neg"])[0]
        pos_min = reference(tiny_model, [queries[i]], row["pos"])[0].min()
        assert (neg_scores <= cap + 1e-4).all()
        assert (neg_scores <= pos_min + 1e-4).all()
    short = [r for r in rows if len(r["neg"]) < NUMBER]
    assert result.short_rows == len(short)
    # a range narrower than negative_number leaves every row short: reported, never padded
    result = mine(mine_args(tiny_model, pairs, pool, tmp_path / "short", range_for_sampling="0-4"))
    rows = read_rows(str(tmp_path / "short"))
    assert all(len(r["neg"]) <= 4 for r in rows)
    assert result.short_rows == len(rows) and len(result.short_examples) == 5
    assert "fewer than 6 negatives" in open(tmp_path / "short" / "report.txt", encoding="utf-8").read()


def test_mine_bad_input(ray_cluster, tiny_model, pairs_file, tmp_path):
    pairs, pool, _ = pairs_file
    with pytest.raises(ConfigError, match="range_for_sampling"):
        mine(mine_args(tiny_model, pairs, pool, tmp_path / "o", range_for_sampling="50-10"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="not empty"):
        mine(mine_args(tiny_model, pairs, pool, tmp_path / "full"))
    with pytest.raises(ConfigError, match="unknown config key 'negative_numbr'.*negative_number"):
        mine({**mine_args(tiny_model, pairs, pool, tmp_path / "o"), "negative_numbr": 3})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(pairs).readline() + '{"query": "q", "pos": "not a list"}\n')
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:2: 'pos' must be a list"):
        mine(mine_args(tiny_model, str(bad), pool, tmp_path / "o2"))
    bad_pool = tmp_path / "pool.jsonl"
    bad_pool.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataValidationError, match=r"pool\.jsonl:2: a candidate needs a string 'text'"):
        mine(mine_args(tiny_model, pairs, str(bad_pool), tmp_path / "o3"))


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.helpers import minilm_path

    path = str(tmp_path_factory.mktemp("tiny_reranker"))
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_score_with_cross_encoder_llm_reranker_and_bi_encoder(ray_cluster, tiny_reranker, tiny_llm_reranker, tiny_model,
                                                             tmp_path):

    src = tmp_path / "rows.jsonl"
    with open(FE_EXAMPLES, encoding="utf-8") as f:
        lines = [json.loads(f.readline()) for _ in range(12)]
    lines[0].update(query_prompt="Q: ", passage_prompt="P: ")  # a reranker row's own instructions: kept
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows_in = read_rows(str(tmp_path))
    result = score(input_file=[str(src)], output_dir=str(tmp_path / "ce"), reranker_name_or_path=tiny_reranker,
                   reranker_max_length=48, batch_size=8, concurrency=2, normalize=True,
                   query_instruction_for_rerank="Q: ", query_instruction_format_for_rerank="<{}>{}")
    rows = read_rows(str(tmp_path / "ce"))
    assert result.num_rows == len(rows) == 12
    import_flag_model()
    from FlagEmbedding import FlagReranker  # add_reranker_score's scorer, with the same flags

    fe = FlagReranker(tiny_reranker, use_fp16=False, devices="cpu", query_instruction_for_rerank="Q: ",
                      query_instruction_format="<{}>{}", normalize=True, max_length=48)
    for row, orig in zip(rows, rows_in, strict=True):
        assert row["pos"] == orig["pos"] and row["neg"] == orig["neg"]
        assert (row.get("query_prompt"), row.get("passage_prompt")) == (orig.get("query_prompt"), orig.get("passage_prompt"))
        assert len(row["pos_scores"]) == len(row["pos"]) and len(row["neg_scores"]) == len(row["neg"])
        want = fe.compute_score([[row["query"], t] for t in row["pos"] + row["neg"]])
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], want, atol=1e-5)
        assert all(0 < x < 1 for x in want)
    summary = scan_triplets(read_triplets([str(tmp_path / "ce")], RowRules(train_group_size=4, knowledge_distillation=True)),
                            skip_bad_rows=False)
    assert summary.num_rows == 12

    # a decoder-only (LLM) reranker: its "Yes" logit, as add_reranker_score.py's FlagLLMReranker gives it
    score(input_file=[str(src)], output_dir=str(tmp_path / "llm"), reranker_name_or_path=tiny_llm_reranker,
          reranker_max_length=40, batch_size=8, concurrency=2, normalize=True, prompt="Relevant?")
    from FlagEmbedding import FlagLLMReranker

    fe = FlagLLMReranker(tiny_llm_reranker, use_fp16=False, devices="cpu", query_instruction_for_rerank=None,
                         passage_instruction_for_rerank=None, normalize=True, max_length=40, prompt="Relevant?")
    for row in read_rows(str(tmp_path / "llm")):
        want = fe.compute_score([[row["query"], t] for t in row["pos"] + row["neg"]])
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], want, atol=1e-5)

    score(input_file=[str(src)], output_dir=str(tmp_path / "bi"), embedder_name_or_path=tiny_model,
          pooling_method="mean", embedder_query_max_length=64, embedder_passage_max_length=64, concurrency=1,
          teacher_temperature=0.05)
    for row in read_rows(str(tmp_path / "bi")):
        # similarities as logits at the given temperature
        want = reference(tiny_model, [row["query"]], row["pos"] + row["neg"])[0] / 0.05
        np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], want, atol=2e-3)


def test_score_needs_exactly_one_teacher(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="exactly one teacher"):
        score(input_file=[FE_EXAMPLES], output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="exactly one teacher"):
        score(input_file=[FE_EXAMPLES], output_dir=str(tmp_path / "o"), embedder_name_or_path=tiny_model,
              reranker_name_or_path=tiny_model)


def test_cli_mine_help_and_config_errors_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "bge_ray.cli", "mine", "--help"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--range_for_sampling" in out.stdout and "--positive_score_ratio" in out.stdout
    out = subprocess.run([sys.executable, "jobs/mine.py", "--input_file", FE_EXAMPLES, "--output_dir",
                          str(tmp_path / "o"), "--negative_number", "0"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and "negative_number must be >= 1" in out.stderr
