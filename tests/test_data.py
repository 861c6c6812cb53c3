"""bge_ray/data/: row validation, real Ray Data reads, group sampling, tokenization, collation."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections import Counter

import pytest

from bge_ray.config import FinetuneConfig
from bge_ray.data import pipeline as data_mod
from bge_ray.data.collate import GroupCollator, pad_ids
from bge_ray.data.pipeline import (
    EpochState,
    build_train_dataset,
    read_triplets,
    scan_triplets,
    tokenize_rows,
    triplet_source,
    window_shuffle,
)
from bge_ray.data.text import TextSpec
from bge_ray.data.triplets import RowRules, parse_line, sample_group, sample_row
from bge_ray.errors import DataValidationError
from tests.helpers import FE_EXAMPLES

GOOD = {"query": "what is a cell", "pos": ["a cell is a unit of life"], "neg": ["rocks", "cars", "rain"]}


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("raw, rules, match", [
    (b'{"query": "q", "pos": ["p"]', RowRules(), "not valid JSON"),
    (b'["query", "pos"]', RowRules(), "expected a JSON object"),
    (_line({"pos": ["p"], "neg": ["n"]}), RowRules(), "missing 'query'"),
    (_line({"query": "  ", "pos": ["p"], "neg": ["n"]}), RowRules(), "'query' is empty"),
    (_line({"query": 3, "pos": ["p"], "neg": ["n"]}), RowRules(), "'query' must be a string"),
    (_line({"query": "q", "neg": ["n"]}), RowRules(), "missing 'pos'"),
    (_line({"query": "q", "pos": [], "neg": ["n"]}), RowRules(), "'pos' is empty"),
    (_line({"query": "q", "pos": "p", "neg": ["n"]}), RowRules(), "'pos' must be a list"),
    (_line({"query": "q", "pos": ["p", 7], "neg": ["n"]}), RowRules(), r"'pos\[1\]' must be a string"),
    (_line({"query": "q", "pos": ["p"], "neg": ["n", None]}), RowRules(), r"'neg\[1\]' must be a string"),
    (_line({"query": "q", "pos": ["p"], "neg": [""]}), RowRules(), r"'neg\[0\]' is an empty string"),
    (_line({"query": "q", "pos": ["p"], "neg": []}), RowRules(train_group_size=8), "mine negatives"),
    (_line({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0], "neg_scores": [0.1]}),
     RowRules(), "'pos_scores' has 2 scores but 'pos' has 1"),
    (b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [NaN], "neg_scores": [0.1]}',
     RowRules(), "finite number"),
    (_line({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [True], "neg_scores": [0.1]}),
     RowRules(), "finite number"),
    (_line({"query": "q", "pos": ["p"], "neg": ["n"]}), RowRules(knowledge_distillation=True),
     "knowledge_distillation needs 'pos_scores'"),
    (_line({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 5}), RowRules(), "'prompt' must be a string"),
    (b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}', RowRules(), "not valid UTF-8"),
])
def test_each_bad_row_kind_names_file_and_line(raw, rules, match):
    row = parse_line(raw, "data/train.jsonl", 17, rules)
    assert row["error"] is not None
    assert row["error"].startswith("data/train.jsonl:17: ")
    assert __import__("re").search(match, row["error"]), row["error"]


def test_good_rows_pass():
    assert parse_line(_line(GOOD), "f", 1, RowRules())["error"] is None
    kd = dict(GOOD, pos_scores=[0.9], neg_scores=[0.1, 0.2, 0.3], prompt="Represent: ")
    row = parse_line(_line(kd), "f", 1, RowRules(knowledge_distillation=True))
    assert row["error"] is None and row["prompt"] == "Represent: " and row["neg_scores"] == [0.1, 0.2, 0.3]
    # no negatives is fine for in-batch-only training
    assert parse_line(_line({"query": "q", "pos": ["p"]}), "f", 1, RowRules(train_group_size=1))["error"] is None


# ---- sampling ----------------------------------------------------------------------------------

def test_sample_group_counts_and_no_repeats_when_enough():
    pos_idx, neg = sample_group(num_pos=3, num_neg=15, group_size=8, seed=1, epoch=0, key=42)
    assert 0 <= pos_idx < 3 and len(neg) == 7 and len(set(neg)) == 7 and all(0 <= j < 15 for j in neg)


def test_sample_group_with_replacement_when_too_few():
    _, neg = sample_group(num_pos=1, num_neg=3, group_size=8, seed=1, epoch=0, key=42)
    counts = Counter(neg)
    assert len(neg) == 7 and set(counts) == {0, 1, 2} and max(counts.values()) <= 3  # ceil(7/3) copies


def test_sample_group_is_seeded_and_changes_each_epoch():
    a = [sample_group(2, 15, 8, seed=7, epoch=0, key=k) for k in range(50)]
    assert a == [sample_group(2, 15, 8, seed=7, epoch=0, key=k) for k in range(50)]
    assert a != [sample_group(2, 15, 8, seed=7, epoch=1, key=k) for k in range(50)]
    assert a != [sample_group(2, 15, 8, seed=8, epoch=0, key=k) for k in range(50)]


def test_group_size_one_needs_no_negatives():
    assert sample_group(1, 0, 1, seed=0, epoch=0, key=0) == (0, [])


# ---- collation -----------------------------------------------------------------------------------

def test_collator_layout_padding_and_teacher_alignment():
    batch = {
        "q_ids": [[101, 5, 102], [101, 6, 7, 8, 102]],
        "pos_ids": [[[101, 10, 102]], [[101, 20, 21, 102]]],
        "neg_ids": [[[101, 11, 102], [101, 12, 12, 102]], [[101, 22, 102], [101, 23, 102]]],
        "pos_scores": [[5.0], [6.0]],
        "neg_scores": [[1.0, 2.0], [3.0, 4.0]],
        "row_key": [1, 2],
    }
    out = GroupCollator(group_size=3, pad_token_id=0, pad_to_multiple_of=8, knowledge_distillation=True)(batch)
    assert out["q_input_ids"].shape == (2, 8) and out["p_input_ids"].shape == (6, 8)
    assert out["q_attention_mask"].sum(1).tolist() == [3, 5]
    # positive first in each group; teacher scores follow the same passages
    first_tokens = out["p_input_ids"][:, 1].tolist()
    assert first_tokens == [10, 11, 12, 20, 22, 23]
    assert out["teacher_scores"].reshape(-1).tolist() == [5.0, 1.0, 2.0, 6.0, 3.0, 4.0]
    # a row that was not cut to its group is refused, not silently trained on
    with pytest.raises(ValueError, match="row 1 holds 1 positive.* and 2 negative.*not a sampled group of 4"):
        GroupCollator(group_size=4, pad_token_id=0)(batch)


def test_sample_row_cuts_the_group_and_its_teacher_scores():
    row = dict(GOOD, neg=[f"n{i}" for i in range(10)], pos=["p0", "p1"], pos_scores=[0.9, 0.8],
               neg_scores=[i / 10 for i in range(10)], row_key=7)
    out = sample_row(row, group_size=4, seed=1, epoch=0)
    pos_idx, neg_idx = sample_group(2, 10, 4, seed=1, epoch=0, key=7)
    assert out["pos"] == [row["pos"][pos_idx]] and out["neg"] == [f"n{j}" for j in neg_idx]
    assert out["pos_scores"] == [row["pos_scores"][pos_idx]] and out["neg_scores"] == [j / 10 for j in neg_idx]
    assert out["query"] == row["query"] and len(set(out["neg"])) == 3
    assert sample_row(row, 4, seed=1, epoch=0) == out  # the draw depends only on (seed, epoch, key)
    # without teacher scores, none appear
    assert sample_row(dict(row, pos_scores=None, neg_scores=None), 4, 1, 0)["neg_scores"] is None


def test_group_draws_change_every_epoch_and_cover_the_negatives_evenly():
    draws = [tuple(sample_group(2, 10, 4, seed=1, epoch=e, key=7)[1]) for e in range(400)]
    assert len(set(draws)) > 300  # 720 ordered triples: a new draw almost every epoch
    counts = Counter(j for d in draws for j in d)
    assert set(counts) == set(range(10))
    assert all(abs(c - 120) < 4 * math.sqrt(120) for c in counts.values())  # 1,200 picks over 10 negatives
    # other rows, other seeds: other draws in the same epoch
    assert sample_group(2, 10, 4, seed=1, epoch=0, key=8) != sample_group(2, 10, 4, seed=1, epoch=0, key=7)
    assert sample_group(2, 10, 4, seed=2, epoch=0, key=7) != sample_group(2, 10, 4, seed=1, epoch=0, key=7)


def test_window_shuffle_permutes_within_its_window():
    rows = [{"i": i} for i in range(500)]
    out = [r["i"] for r in window_shuffle(iter(rows), 50, random.Random(3))]
    assert sorted(out) == list(range(500)) and out != list(range(500))
    # a row leaves at most `window` places before where it came in (the buffer holds no more)
    assert all(pos >= i - 50 for pos, i in enumerate(out))
    assert out == [r["i"] for r in window_shuffle(iter(rows), 50, random.Random(3))]
    assert out != [r["i"] for r in window_shuffle(iter(rows), 50, random.Random(4))]
    # a window as large as the data is a full shuffle
    assert sorted(r["i"] for r in window_shuffle(iter(rows[:20]), 50, random.Random(0))) == list(range(20))


def test_pad_ids_left_and_right():
    ids, mask = pad_ids([[1, 2], [3]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = pad_ids([[1, 2], [3]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


# ---- tokenization --------------------------------------------------------------------------------

def test_tokenize_applies_instructions_and_truncates(tiny_model):
    import pyarrow as pa
    from transformers import AutoTokenizer

    spec = TextSpec(tokenizer=tiny_model, query_max_len=8, passage_max_len=6, query_instruction="search: ",
                    passage_instruction="doc: ")
    rows = [parse_line(_line(GOOD), "f", 1, RowRules()),
            parse_line(_line(dict(GOOD, prompt="find: ", pos=["one two three four five six seven eight"])), "f", 2,
                       RowRules())]
    from bge_ray.data.triplets import ROW_SCHEMA

    out = tokenize_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), spec).to_pylist()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert out[0]["q_ids"] == tok("search: what is a cell")["input_ids"]
    assert out[1]["q_ids"] == tok("find: what is a cell")["input_ids"]  # per-row prompt wins
    assert out[0]["neg_ids"][0] == tok("doc: rocks")["input_ids"]
    assert len(out[1]["pos_ids"][0]) == 6 and out[1]["pos_ids"][0][-1] == tok.sep_token_id
    assert all(len(q) <= 8 for q in (o["q_ids"] for o in out))


# ---- real Ray Data reads -------------------------------------------------------------------------

def _write(path, lines, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


@pytest.fixture(params=["ray-data", "driver", "datasource-over-threshold"])
def scan_data(request, monkeypatch):
    """The three ways a scan runs: a Ray Dataset, a small datasource read on the driver by its own read
    tasks, and a datasource above IN_PROCESS_SCAN_BYTES (handed to Ray Data). All must agree."""
    if request.param == "ray-data":
        return read_triplets
    if request.param == "datasource-over-threshold":
        monkeypatch.setattr(data_mod, "IN_PROCESS_SCAN_BYTES", 0)
    return triplet_source


def test_reads_files_dirs_globs_and_gzip(ray_cluster, tmp_path, scan_data):
    good = json.dumps(GOOD)
    _write(str(tmp_path / "a" / "one.jsonl"), [good] * 3)
    _write(str(tmp_path / "a" / "two.jsonl.gz"), [good] * 4 + [""], gz=True)
    _write(str(tmp_path / "b" / "three.json"), [good] * 5)
    (tmp_path / "a" / "notes.txt").write_text("not data")
    ds = scan_data([str(tmp_path / "a"), str(tmp_path / "b" / "*.json")], RowRules())
    summary = scan_triplets(ds, skip_bad_rows=False)
    assert summary.num_rows == 12 and summary.num_bad == 0


def test_bad_row_fails_the_scan_with_file_and_line(ray_cluster, tmp_path, scan_data):
    good = json.dumps(GOOD)
    path = str(tmp_path / "train.jsonl")
    _write(path, [good, good, '{"query": "q", "pos": ["p"]  oops', good])
    with pytest.raises(DataValidationError, match=rf"{path}:3: not valid JSON"):
        scan_triplets(scan_data([path], RowRules()), skip_bad_rows=False)


def test_skip_bad_rows_counts_and_reports(ray_cluster, tmp_path, scan_data):
    good = json.dumps(GOOD)
    path = str(tmp_path / "train.jsonl")
    _write(path, [good, "garbage", good, json.dumps({"query": "q", "pos": []}), good])
    summary = scan_triplets(scan_data([path], RowRules()), skip_bad_rows=True)
    assert (summary.num_rows, summary.num_bad) == (3, 2)
    assert any(e.startswith(f"{path}:2:") for e in summary.first_errors)
    assert any(e.startswith(f"{path}:4:") for e in summary.first_errors)
    assert "2 bad rows skipped" in summary.describe()


def test_json_array_file_is_explained(ray_cluster, tmp_path, scan_data):
    path = str(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD]))
    with pytest.raises(DataValidationError, match="JSON Lines"):
        scan_triplets(scan_data([path], RowRules()), skip_bad_rows=False)


def test_max_example_num_per_dataset_is_a_seeded_sample(ray_cluster, tmp_path):
    path = str(tmp_path / "train.jsonl")
    _write(path, [json.dumps(dict(GOOD, query=f"q{i}")) for i in range(40)])

    def queries(seed):
        return sorted(r["query"] for r in read_triplets([path], RowRules(), max_examples=10, seed=seed).take_all())

    first = queries(1)
    assert len(first) == 10 and first == queries(1) and first != queries(2)
    # the driver's scan counts the same sample the pipeline then reads
    assert scan_triplets(triplet_source([path], RowRules(), max_examples=10, seed=1), skip_bad_rows=False).num_rows == 10


def test_build_train_dataset_tokenizes_fe_examples(ray_cluster, tiny_model, tmp_path):
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=[FE_EXAMPLES], output_dir=str(tmp_path),
                         train_group_size=4, query_max_len=16, passage_max_len=24)
    ds, summary = build_train_dataset(cfg)
    rows = ds.take_all()
    assert summary.num_rows == len(rows) == 50
    assert all(len(r["q_ids"]) <= 16 and all(len(p) <= 24 for p in r["neg_ids"]) for r in rows)
    assert len({r["row_key"] for r in rows}) == 50


def test_training_pass_reshuffles_resamples_and_leaves_out_rows_per_epoch(ray_cluster, tiny_model, tmp_path):
    import ray

    path = str(tmp_path / "train.jsonl")
    _write(path, [json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i} {j}" for j in range(12)]})
                  for i in range(200)])
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=[path], output_dir=str(tmp_path),
                         train_group_size=4, query_max_len=16, passage_max_len=24, shuffle_buffer_size=64)
    state = ray.remote(EpochState).remote()
    ds, summary = build_train_dataset(cfg, state)

    def epoch_pass(epoch, leave_out=()):
        ray.get(state.begin.remote(epoch, list(leave_out)))
        blocks = [b.num_rows() for b in ds.iter_internal_ref_bundles()]
        rows = ds.take_all()
        return blocks, [r["row_key"] for r in rows], {r["row_key"]: [list(p) for p in r["neg_ids"]] for r in rows}

    blocks, order0, negs0 = epoch_pass(0)
    # each row holds its sampled group only, and leaves in small blocks (the first batch waits for
    # a few tokenize tasks, not for the whole file)
    assert summary.num_rows == len(order0) == 200 and all(len(n) == 3 for n in negs0.values())
    assert max(blocks) <= data_mod.TOKENIZE_BATCH_ROWS and len(blocks) >= 200 // data_mod.TOKENIZE_BATCH_ROWS
    assert order0 != sorted(order0)
    _, order0_again, negs0_again = epoch_pass(0)
    assert negs0_again == negs0  # seeded: the same epoch draws the same groups
    _, order1, negs1 = epoch_pass(1)
    assert sorted(order1) == sorted(order0) and order1 != order0  # another epoch, another order
    assert sum(negs1[k] != negs0[k] for k in negs0) > 150  # and other negatives for most rows
    _, order2, _ = epoch_pass(2, leave_out=order0[:30])
    assert sorted(order2) == sorted(order0[30:])


def test_reads_cloud_uris_and_names_the_object_and_line(ray_cluster, s3, scan_data):
    with open(FE_EXAMPLES, "rb") as f:
        s3.put_object(Bucket="bge-ray-test", Key="train/good.jsonl", Body=f.read())
    summary = scan_triplets(scan_data(["s3://bge-ray-test/train/"], RowRules()), skip_bad_rows=False)
    assert summary.num_rows == 50
    s3.put_object(Bucket="bge-ray-test", Key="bad/rows.jsonl", Body=(json.dumps(GOOD) + "\n{oops\n").encode())
    with pytest.raises(DataValidationError, match=r"bge-ray-test/bad/rows.jsonl:2: not valid JSON"):
        scan_triplets(scan_data(["s3://bge-ray-test/bad/rows.jsonl"], RowRules()), skip_bad_rows=False)


def test_group_by_length_keeps_the_rows_and_pads_less():
    import numpy as np

    from bge_ray.data.collate import length_grouped, row_length

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 250, size=32 * 8)

    def objects(items):  # a column of lists, as Ray Data's numpy batches hold them
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out

    def stream():
        for b in range(32):
            rows = range(b * 8, (b + 1) * 8)
            yield {"row_key": np.array(list(rows)),
                   "pos_ids": objects([[list(range(lengths[r]))] for r in rows]),
                   "neg_ids": objects([[[1, 2]] for _ in rows])}

    def padded(batches):
        return sum(8 * max(row_length(p, n) for p, n in zip(b["pos_ids"], b["neg_ids"], strict=True)) for b in batches)

    plain = list(stream())
    grouped = list(length_grouped(stream(), batch_size=8, seed=3))
    assert len(grouped) == len(plain) and all(len(b["row_key"]) == 8 for b in grouped)
    keys = np.concatenate([b["row_key"] for b in grouped])
    assert sorted(keys.tolist()) == list(range(256))  # every row once
    assert all(row_length(p, n) == lengths[k] for b in grouped for k, p, n in zip(b["row_key"], b["pos_ids"], b["neg_ids"], strict=True))
    assert padded(grouped) < 0.75 * padded(plain)
    # batches come in a seeded random order, not shortest first
    longest = [max(lengths[b["row_key"]]) for b in grouped[:16]]
    assert longest != sorted(longest)
    again = list(length_grouped(stream(), batch_size=8, seed=3))
    assert all((a["row_key"] == b["row_key"]).all() for a, b in zip(grouped, again, strict=True))
