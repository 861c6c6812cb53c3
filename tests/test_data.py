"""bge_ray/data/: row validation, real Ray Data reads, group sampling, tokenization, collation."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest

from bge_ray.config import FinetuneConfig
from bge_ray.data import scan as scan_mod
from bge_ray.data.collate import GroupCollator, pad_ids
from bge_ray.data.pipeline import router_batches, shuffle_text, start_router, tokenize_rows
from bge_ray.data.plan import DataSet, FileIndex, batches_per_epoch, group_datasets, plan_epoch
from bge_ray.data.scan import load_training_data
from bge_ray.data.text import TextSpec
from bge_ray.data.triplets import RowRules, parse_line, sample_group, sample_row
from bge_ray.errors import DataValidationError
from tests.helpers import FE_EXAMPLES, fe_same_dataset_args

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


# ---- the scan: real files, real Ray Data -----------------------------------------------------------

def _write(path, lines, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


@pytest.fixture(params=["driver", "ray-data"])
def do_scan(request, monkeypatch, tmp_path):
    """The two ways the scan runs: small data by its read tasks on the driver, larger data by Ray Data
    tasks (the threshold lowered to 0). Both must agree."""
    if request.param == "ray-data":
        monkeypatch.setattr(scan_mod, "IN_PROCESS_SCAN_BYTES", 0)

    def run(paths, skip_bad_rows=False, max_examples=10**8, seed=0, rules=None):
        return scan_mod.scan(paths, rules or RowRules(), skip_bad_rows, max_examples, seed,
                             cache_path=str(tmp_path / "cache"))
    return run


def test_reads_files_dirs_globs_and_gzip(ray_cluster, tmp_path, do_scan):
    good = json.dumps(GOOD)
    _write(str(tmp_path / "a" / "one.jsonl"), [good] * 3)
    _write(str(tmp_path / "a" / "two.jsonl.gz"), [good] * 4 + [""], gz=True)
    _write(str(tmp_path / "b" / "three.json"), [good] * 5)
    (tmp_path / "a" / "notes.txt").write_text("not data")
    files, summary = do_scan([str(tmp_path / "a"), str(tmp_path / "b" / "*.json")])
    assert summary.num_rows == 12 and summary.num_bad == 0
    gz = next(f for f in files if f.path.endswith(".gz"))
    assert gz.read_path.startswith(str(tmp_path / "cache")) and open(gz.read_path).read().count("\n") == 5
    made = os.path.getmtime(gz.read_path)
    again, _ = do_scan([str(tmp_path / "a")])
    assert next(f for f in again if f.path.endswith(".gz")).read_path == gz.read_path  # the plain copy is reused
    assert os.path.getmtime(gz.read_path) == made


def test_bad_row_fails_the_scan_with_file_and_line(ray_cluster, tmp_path, do_scan):
    good = json.dumps(GOOD)
    path = str(tmp_path / "train.jsonl")
    _write(path, [good, good, '{"query": "q", "pos": ["p"]  oops', good])
    with pytest.raises(DataValidationError, match=rf"{path}:3: not valid JSON"):
        do_scan([path])


def test_skip_bad_rows_counts_and_reports(ray_cluster, tmp_path, do_scan):
    good = json.dumps(GOOD)
    path = str(tmp_path / "train.jsonl")
    _write(path, [good, "garbage", good, json.dumps({"query": "q", "pos": []}), good])
    files, summary = do_scan([path], skip_bad_rows=True)
    assert (summary.num_rows, summary.num_bad, files[0].rows) == (3, 2, 3)
    assert any(e.startswith(f"{path}:2:") for e in summary.first_errors)
    assert any(e.startswith(f"{path}:4:") for e in summary.first_errors)
    assert "2 bad rows skipped" in summary.describe()


def test_json_array_file_is_explained(ray_cluster, tmp_path, do_scan):
    path = str(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD]))
    with pytest.raises(DataValidationError, match="JSON Lines"):
        do_scan([path])


def test_truncated_gzip_and_unreadable_files_are_named(ray_cluster, tmp_path, do_scan):
    path = str(tmp_path / "train.jsonl.gz")
    _write(path, [json.dumps(dict(GOOD, query=f"q{i} " + "x" * 200)) for i in range(300)], gz=True)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(DataValidationError, match=rf"{path}: cannot be read past line \d+"):
        do_scan([path])
    assert not os.listdir(tmp_path / "cache")  # no half copy left to be taken for a whole one
    gone = str(tmp_path / "gone.jsonl")
    os.symlink(str(tmp_path / "nowhere"), gone)
    with pytest.raises(DataValidationError, match=rf"{gone}: cannot be (opened|listed)"):
        do_scan([gone])


def test_empty_inputs_are_named(ray_cluster, tmp_path, do_scan):
    empty, blank = str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.jsonl")
    open(empty, "w").close()
    _write(blank, ["", "   ", ""])
    with pytest.raises(DataValidationError, match=rf"no usable rows: {blank}, {empty} hold none"):
        do_scan([empty, blank])
    _write(str(tmp_path / "good.jsonl"), [json.dumps(GOOD)] * 3)
    _, summary = do_scan([empty, str(tmp_path / "good.jsonl")])
    assert summary.empty_files == [empty] and empty in summary.describe()


def test_max_example_num_per_dataset_is_a_seeded_sample(ray_cluster, tmp_path, do_scan):
    path = str(tmp_path / "train.jsonl")
    _write(path, [json.dumps(dict(GOOD, query=f"q{i}")) for i in range(40)])

    def kept(seed):
        (f,), summary = do_scan([path], max_examples=10, seed=seed)
        assert summary.num_rows == f.kept == 10
        return f.keep.tolist()

    assert kept(1) == kept(1) and kept(1) != kept(2)


def test_reads_cloud_uris_and_names_the_object_and_line(ray_cluster, s3, do_scan):
    with open(FE_EXAMPLES, "rb") as f:
        s3.put_object(Bucket="bge-ray-test", Key="train/good.jsonl", Body=f.read())
    files, summary = do_scan(["s3://bge-ray-test/train/"])
    assert summary.num_rows == 50 and files[0].path == "s3://bge-ray-test/train/good.jsonl"
    s3.put_object(Bucket="bge-ray-test", Key="bad/rows.jsonl", Body=(json.dumps(GOOD) + "\n{oops\n").encode())
    with pytest.raises(DataValidationError, match=r"s3://bge-ray-test/bad/rows.jsonl:2: not valid JSON"):
        do_scan(["s3://bge-ray-test/bad/rows.jsonl"])


# ---- the epoch plan: arithmetic on the index ------------------------------------------------------

def _index(path, rows, chunk_rows=4, keep=None, first=None):
    """A FileIndex as the scan makes it, for a file of ``rows`` one-line rows."""
    starts = np.arange(0, rows, chunk_rows)
    return FileIndex(path, path, rows, starts + 1, starts * 10, chunk_rows, keep, first or {})


def _epoch_rows(plan, files):
    """(file, ordinal) of every row the plan's windows hold, in stream order, per data set."""
    out = {}
    for d, k, trained in plan.windows():
        rows = []
        for s in plan.segments(d, k):
            f = files[s.file]
            kept = f.kept_in_chunk(s.chunk)
            ordinals = np.arange(s.chunk * f.chunk_rows, min(f.rows, (s.chunk + 1) * f.chunk_rows)) if kept is None else kept
            rows.extend((s.file, int(o)) for o in ordinals[s.skip:s.skip + s.take])
        out.setdefault(d, []).extend(rows[trained:])
    return out


def test_plan_trains_every_kept_row_once_and_resumes_exactly():
    files = [_index("a", 103), _index("b", 57, keep=np.array([1, 5, 6, 30, 31, 32, 50])), _index("c", 40)]
    ds = [DataSet("all", (0, 1, 2), batch_size=4, group_size=2)]
    plan = plan_epoch(files, ds, seed=3, epoch=0, world=2, window_rows=32)
    rows = _epoch_rows(plan, files)[0]
    want = [(0, i) for i in range(103)] + [(1, i) for i in (1, 5, 6, 30, 31, 32, 50)] + [(2, i) for i in range(40)]
    assert sorted(rows) == want and rows != want
    assert plan.batches == 150 // 8 == batches_per_epoch(files, ds, 2)
    assert _epoch_rows(plan_epoch(files, ds, 3, 0, 2, 32), files)[0] == rows  # seeded
    assert _epoch_rows(plan_epoch(files, ds, 3, 1, 2, 32), files)[0] != rows  # a new order every epoch
    for done in (1, 5, 17):  # a resumed epoch reads exactly the rows after the trained batches
        assert _epoch_rows(plan.after(done), files)[0] == rows[done * 8:][:len(rows) - done * 8]
    unshuffled = plan_epoch(files, ds, 3, 0, 2, 32, shuffle=False)
    assert _epoch_rows(unshuffled, files)[0] == want


def _mixing(batches, label_of, n):
    """Share of same-label pairs within batches, and Spearman's rho between epoch and disk position."""
    same = total = 0
    for batch in batches:
        labels = [label_of[r] for r in batch]
        same += sum(a == b for i, a in enumerate(labels) for b in labels[i + 1:])
        total += len(labels) * (len(labels) - 1) // 2
    order = [r for b in batches for r in b]
    pos = np.argsort(np.argsort(order))
    rho = np.corrcoef(pos, np.sort(order))[0, 1] if len(order) > 1 else 0.0
    return same / total, rho


def test_an_epoch_mixes_label_sorted_files_like_a_random_permutation():
    """4 files, each sorted by a label (1,000 rows of one topic each): batches of 16 drawn from the
    plan's stream (the windows' rows in the order the pipeline puts them) against true random
    permutations of all rows."""
    import random as stdlib_random

    from bge_ray.seeds import window_rng

    files = [_index(f"topic{t}.jsonl", 1000) for t in range(4)]
    ds = [DataSet("all", (0, 1, 2, 3), batch_size=8, group_size=2)]
    plan = plan_epoch(files, ds, seed=0, epoch=0, world=2, window_rows=1000)
    stream = []
    for d, k, _ in plan.windows():
        rows = [f * 1000 + s.chunk * 4 + s.skip + i for s in plan.segments(d, k) for i in range(s.take)
                for f in [s.file]]
        window_rng(0, 0, d, k).shuffle(rows)
        stream.extend(rows)
    label = {r: r // 1000 for r in range(4000)}
    got_same, got_rho = _mixing([stream[i:i + 16] for i in range(0, 4000, 16)], label, 4000)
    ref = []
    for seed in range(200):
        perm = list(range(4000))
        stdlib_random.Random(seed).shuffle(perm)
        ref.append(_mixing([perm[i:i + 16] for i in range(0, 4000, 16)], label, 4000))
    same_ref, rho_ref = np.array(ref).T
    assert abs(got_same - same_ref.mean()) < 4 * same_ref.std()
    assert abs(got_rho - rho_ref.mean()) < 4 * rho_ref.std()
    # the yardstick can fail: the old per-file 1,000-row window (one file per window) is far off
    old_same, _ = _mixing([list(range(i, i + 16)) for i in range(0, 4000, 16)], label, 4000)
    assert abs(old_same - same_ref.mean()) > 10 * same_ref.std()


def test_same_dataset_batches_follow_flagembedding_rules():
    files = [_index("/d/retrieval.jsonl", 64, first={"type": None}),
             _index("/d/sts.jsonl", 40, first={"type": "symmetric_sts"}),
             _index("/c-no_in_batch_neg/cls.jsonl", 48, first={"type": "symmetric_class", "num_neg": 3}),
             _index("/d/tiny1.jsonl", 6, first={"batch_size": 2}), _index("/d/tiny2.jsonl", 5),
             _index("/e/tiny3.jsonl", 3), _index("/other.jsonl", 2), _index("/x-no_in_batch_neg.jsonl", 16)]
    # as FlagEmbedding: a folder's name flags its files, a file named directly its own name
    folders = {0: "/d", 1: "/d", 2: "/c-no_in_batch_neg", 3: "/d", 4: "/d", 5: "/e"}
    sets, dropped = group_datasets(files, folders, batch_size=8, group_size=4, same_dataset=True,
                                   small_threshold=10, drop_threshold=5)
    by_name = {s.name: s for s in sets}
    assert (by_name["/d/retrieval.jsonl"].batch_size, by_name["/d/retrieval.jsonl"].group_size) == (8, 4)
    sts = by_name["/d/sts.jsonl"]
    assert (sts.batch_size, sts.symmetric, sts.in_batch_negatives) == (4, True, True)  # symmetric: half the batch
    cls = by_name["/c-no_in_batch_neg/cls.jsonl"]
    assert (cls.batch_size, cls.kind, cls.in_batch_negatives) == (4, "symmetric_class", False)
    assert not by_name["/x-no_in_batch_neg.jsonl"].in_batch_negatives
    assert by_name["/d/retrieval.jsonl"].in_batch_negatives
    merged = by_name["/d (small files)"]
    assert merged.files == (3, 4) and merged.batch_size == 2  # the folder's small files, one data set
    assert any("/e" in d and "drop_threshold" in d for d in dropped)
    assert any("/other.jsonl" in d and "small_threshold" in d for d in dropped)
    plan = plan_epoch(files, sets, seed=1, epoch=0, world=2, window_rows=16)
    per_set = _epoch_rows(plan, files)
    taken = {d: 0 for d in range(len(sets))}
    kinds = []
    for b in range(plan.batches):  # every global batch holds rows of one data set only, its batch size x 2
        d = int(plan.batch_dataset[b])
        size = sets[d].batch_size * 2
        batch = per_set[d][taken[d]:taken[d] + size]
        assert len(batch) == size and {f for f, _ in batch} <= set(sets[d].files)
        taken[d] += size
        kinds.append(d)
    assert len(set(kinds)) == len(sets) and kinds != sorted(kinds)  # the data sets' batches shuffled together
    assert plan.batches == batches_per_epoch(files, sets, 2)


def test_shuffle_ratio_cuts_long_texts_in_three_and_reorders_them():
    import random as stdlib_random

    long = "".join(f"w{i:03d} " for i in range(40))
    assert shuffle_text("short text", 1.0, stdlib_random.Random(0)) == "short text"
    assert shuffle_text(long, 0.0, stdlib_random.Random(0)) == long
    size = len(long) // 3 + 1
    pieces = [long[i:i + size] for i in range(0, len(long), size)]
    orders = {" ".join(p) for p in itertools.permutations(pieces)}
    shuffled = [shuffle_text(long, 1.0, stdlib_random.Random(s)) for s in range(20)]
    assert len(pieces) == 3 and all(t in orders for t in shuffled) and len(set(shuffled)) > 2
    kept = sum(shuffle_text(long, 0.3, stdlib_random.Random(s)) == long for s in range(400))
    assert 240 < kept < 320  # cut with probability 0.3 (and a cut may land in the original order: 1/6)


# ---- the router: each epoch's batches through real Ray Data and a Ray actor ------------------------

def _router_epoch(router, world, epoch, done=0):
    import threading

    import ray

    left = ray.get(router.begin.remote(epoch, done))
    got = [[] for _ in range(world)]

    def drain(rank):
        got[rank] = [(d, b["row_key"].tolist(), [len(n) for n in b["neg_ids"]])
                     for d, b in router_batches(router, rank)]

    threads = [threading.Thread(target=drain, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(g) == left for g in got)
    return got


def test_router_hands_every_worker_its_slice_of_the_planned_batches(ray_cluster, tiny_model, tmp_path):
    import ray

    paths = []
    for t in range(3):
        paths.append(str(tmp_path / f"topic{t}.jsonl"))
        _write(paths[-1], [json.dumps({"query": f"t{t} q{i}", "pos": [f"p{i}"], "neg": [f"n{i} {j}" for j in range(5)]})
                           for i in range(70)])
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=paths, output_dir=str(tmp_path / "out"),
                         train_group_size=3, per_device_train_batch_size=4, shuffle_buffer_size=20)
    data = load_training_data(cfg, str(tmp_path / "cache"))
    router = start_router(dataclasses.replace(cfg, num_workers=2), data)
    first = _router_epoch(router, 2, epoch=0)
    keys = [k for rank in first for _, batch, _ in rank for k in batch]
    assert len(keys) == len(set(keys)) == data.batches_per_epoch(2) * 8 == 208  # every row at most once
    assert all(n == [2] * 4 for rank in first for _, _, n in rank for n in [n])  # sampled groups
    assert _router_epoch(router, 2, epoch=0) == first  # the same batches in the same order, every time
    assert _router_epoch(router, 2, epoch=1) != first
    resumed = _router_epoch(router, 2, epoch=0, done=10)
    assert resumed == [rank[10:] for rank in first]  # a resumed epoch: exactly the batches after the trained ones
    ray.kill(router)
    # HF's data_seed: a seed for the order alone
    reordered = start_router(dataclasses.replace(cfg, num_workers=2, data_seed=cfg.seed + 1), data)
    other = _router_epoch(reordered, 2, epoch=0)
    ray.kill(reordered)
    rows = {k for rank in other for _, batch, _ in rank for k in batch}
    assert other != first and len(rows & set(keys)) >= len(keys) - 8  # another order, of the same rows


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
    grouped = list(length_grouped(stream(), batch_size=8, seed=3, epoch=0, rank=0))
    assert len(grouped) == len(plain) and all(len(b["row_key"]) == 8 for b in grouped)
    keys = np.concatenate([b["row_key"] for b in grouped])
    assert sorted(keys.tolist()) == list(range(256))  # every row once
    assert all(row_length(p, n) == lengths[k] for b in grouped for k, p, n in zip(b["row_key"], b["pos_ids"], b["neg_ids"], strict=True))
    assert padded(grouped) < 0.75 * padded(plain)
    # batches come in a seeded random order, not shortest first
    longest = [max(lengths[b["row_key"]]) for b in grouped[:16]]
    assert longest != sorted(longest)
    again = list(length_grouped(stream(), batch_size=8, seed=3, epoch=0, rank=0))
    assert all((a["row_key"] == b["row_key"]).all() for a, b in zip(grouped, again, strict=True))
    # a resumed epoch restarts at a pool's first batch and regroups that pool the same way
    later = itertools.islice(stream(), 16, None)
    resumed = list(length_grouped(later, batch_size=8, seed=3, epoch=0, rank=0, first_pool=1))
    assert all((a["row_key"] == b["row_key"]).all() for a, b in zip(grouped[16:], resumed, strict=True))


# ---- bge-ray preview ------------------------------------------------------------------------------

def _preview(tmp_path, args, steps):
    from bge_ray.cli import main

    out = str(tmp_path / "preview.jsonl")
    assert main(["preview", *args, "--steps", str(steps), "--preview_file", out]) == 0
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_preview_of_flagembedding_same_dataset_example(ray_cluster, tiny_model, tmp_path, capfd):
    """base_same_dataset.sh's data on 2 workers: every batch from one file, of that file's batch size
    (symmetric tasks half the batch), each row what the file holds at that line."""
    args = fe_same_dataset_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "cache")) + ["--num_workers", "2"]
    lines = _preview(tmp_path, args, steps=31)
    assert len(lines) == 31 * 2  # FlagEmbedding's arithmetic: sum over files of rows // (batch x 2) = 31
    sizes = {"retrieval": 2, "sts": 1, "classification": 1, "clustering": 1}
    seen = set()
    for batch in range(31):
        pair = [x for x in lines if x["batch"] == batch]
        files = {r["source"].rpartition(":")[0] for x in pair for r in x["rows"]}
        assert len(files) == 1, files  # one file a batch, across both workers
        (path,) = files
        kind = next(k for k in sizes if f"/{k}" in path)
        assert all(len(x["rows"]) == sizes[kind] for x in pair)
        seen.add(path)
        for x in pair:
            for r in x["rows"]:
                src, _, line = r["source"].rpartition(":")
                with open(src, encoding="utf-8") as f:
                    row = json.loads(f.read().splitlines()[int(line) - 1])
                assert r["query"] == row["query"] and r["pos"][0] in row["pos"] and set(r["neg"]) <= set(row["neg"])
            # FlagEmbedding's symmetric_class group: the first row of the worker's batch sets its size
            first = json.loads(open(x["rows"][0]["source"].rpartition(":")[0]).read().splitlines()[
                int(x["rows"][0]["source"].rpartition(":")[2]) - 1])
            want = {"only_1neg": 1, "symmetric_class": min(len(first["neg"]) + 1, 8) - 1}.get(first.get("type"), 7)
            assert all(len(r["neg"]) == want for r in x["rows"])
    assert len(seen) == 8
    order = [next(k for k in sizes if f"/{k}" in x["rows"][0]["source"]) for x in lines[::2]]
    assert order != sorted(order)  # the files' batches shuffled together
    assert "every batch is from one data set" in capfd.readouterr().err


def test_preview_mixes_label_sorted_files_and_is_reproducible(ray_cluster, tiny_model, tmp_path, capfd):
    paths = []
    for t in range(4):
        paths.append(str(tmp_path / f"topic{t}.jsonl"))
        _write(paths[-1], [json.dumps({"query": f"t{t} q{i}", "pos": [f"t{t} p{i}"], "neg": [f"n{j}" for j in range(3)]})
                           for i in range(300)])
    args = ["--model_name_or_path", tiny_model, "--train_data", *paths, "--output_dir", str(tmp_path / "out"),
            "--num_workers", "2", "--per_device_train_batch_size", "8", "--train_group_size", "2"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _preview(tmp_path / "a", args, steps=20)
    assert _preview(tmp_path / "b", args, steps=20) == first  # the same rows for the same seed, every run
    err = capfd.readouterr().err
    same, ref, sd = (float(x) for x in re.search(r"([\d.]+) of them from the same file \(random permutations: "
                                                  r"([\d.]+) \+- ([\d.]+)\)", err).groups())
    assert abs(same - ref) < 4 * sd
    topics = [[int(r["query"][1]) for x in first if x["batch"] == b for r in x["rows"]] for b in range(20)]
    assert all(len(t) == 16 for t in topics) and sum(len(set(t)) == 1 for t in topics) == 0
