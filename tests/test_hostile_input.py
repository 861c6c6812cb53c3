"""Hostile input: broken files through the real Ray Data reader, junk configs, unsafe model files.

Each case must end in a clear error naming the file and line (or, with ``skip_bad_rows``, a
counted skip), never a hang, a crashed cluster or rows silently read wrong.
"""

from __future__ import annotations

import io
import json
import os
import random
import tracemalloc

import pytest
import torch

from bge_ray.config import FinetuneConfig, resolve_config
from bge_ray.data.jsonl import LineTooLong, iter_lines
from bge_ray.data.read import read_triplets, scan_triplets
from bge_ray.data.triplets import RowRules
from bge_ray.errors import ConfigError, DataValidationError
from tests.helpers import FE_EXAMPLES, minilm_path

GOOD = {"query": "what is a cell", "pos": ["a cell is the unit of life"], "neg": ["a prison cell", "a battery cell"],
        "pos_scores": [0.9], "neg_scores": [0.2, 0.1]}


def good_line(i=0) -> bytes:
    return json.dumps(dict(GOOD, query=f"what is cell {i}")).encode() + b"\n"


def _cases(d):
    """name -> (path, number of good rows, bad line number, what the error must say)."""
    cases = {}

    def add(name, data, good, bad_line, says):
        path = os.path.join(d, f"{name}.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        cases[name] = (path, good, bad_line, says)

    add("truncated", good_line(1) + good_line(2) + good_line(3)[:25], 2, 3, "not valid JSON")
    rng = random.Random(0)
    garbage = bytes(rng.randrange(256) for _ in range(4096)).replace(b"\n", b"\x00")
    add("binary_garbage", good_line() + garbage + b"\n" + good_line(1), 2, 2, "not valid UTF-8")
    add("line_of_50_mb", good_line() + b'{"query": "' + b"x" * (50 << 20) + b'"}\n' + good_line(1), 2, 2,
        "the line is 50.0 MiB, over the 16 MiB limit")
    add("utf16", ("\ufeff" + good_line().decode()).encode("utf-16-le"), 0, 1, "the file is UTF-16")
    add("latin1", good_line() + json.dumps(dict(GOOD, query="caf\u00e9"), ensure_ascii=False).encode("latin-1")
        + b"\n", 1, 2, "not valid UTF-8")
    add("deeply_nested", good_line() + b'{"query": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", 1, 2,
        "not valid JSON (nested too deeply)")
    add("nan_score", good_line() + json.dumps(dict(GOOD, pos_scores=[float("nan")])).encode() + b"\n", 1, 2,
        "'pos_scores[0]' must be a finite number, got nan")
    add("inf_score", good_line() + json.dumps(dict(GOOD, neg_scores=[0.1, float("inf")])).encode() + b"\n", 1, 2,
        "'neg_scores[1]' must be a finite number, got inf")
    add("huge_list", good_line() + json.dumps(dict(GOOD, neg=["n"] * 20_000, neg_scores=[0.0] * 20_000)).encode()
        + b"\n", 1, 2, "'neg' has 20000 passages, more than the 10000")
    add("huge_integer", good_line() + b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1' + b"0" * 5000
        + b'], "neg_scores": [0]}\n', 1, 2, "not valid JSON")
    add("wrong_types", good_line() + json.dumps(dict(GOOD, query=["a", "list"])).encode() + b"\n", 1, 2,
        "'query' must be a string, got list")
    add("json_array", b"[" + good_line().rstrip() + b"]\n", 0, 1, "the file is a JSON array; bge-ray reads JSON Lines")
    return cases


@pytest.mark.timeout(600)
def test_broken_files_name_file_and_line_or_are_counted(ray_cluster, tmp_path):
    cases = _cases(str(tmp_path))
    rules = RowRules(train_group_size=3, knowledge_distillation=True)
    for name, (path, good, bad_line, says) in cases.items():
        with pytest.raises(DataValidationError) as err:
            scan_triplets(read_triplets([path], rules), skip_bad_rows=False)
        assert f"{path}:{bad_line}: {says}" in str(err.value), name
        if good:
            summary = scan_triplets(read_triplets([path], rules), skip_bad_rows=True)
            assert (summary.num_rows, summary.num_bad) == (good, 1), name
    # all of them at once, skipping: every good row counted, every bad one counted, nothing else
    summary = scan_triplets(read_triplets([c[0] for c in cases.values() if c[1]], rules), skip_bad_rows=True)
    assert summary.num_rows == sum(c[1] for c in cases.values())
    assert summary.num_bad == sum(1 for c in cases.values() if c[1])
    assert ray_cluster.cluster_resources()["CPU"] >= 1  # the cluster is still there


def test_utf8_bom_is_read_like_plain_utf8(ray_cluster, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good_line(1) + good_line(2))
    rows = read_triplets([str(path)], RowRules(train_group_size=3)).take_all()
    assert [r["query"] for r in rows] == ["what is cell 1", "what is cell 2"]
    assert all(r["error"] is None for r in rows)


def test_an_over_long_line_is_never_held_in_memory():
    stream = io.BytesIO(good_line(1) + b"y" * (20 << 20) + b"\n\n" + good_line(2))
    tracemalloc.start()
    try:
        lines = list(iter_lines(stream, max_line_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [n for n, _ in lines] == [1, 2, 4]  # the blank line 3 is skipped, numbering goes on
    assert isinstance(lines[1][1], LineTooLong) and lines[1][1].size == 20 << 20
    assert json.loads(lines[2][1])["query"] == "what is cell 2"
    assert peak < 6 << 20  # a couple of 1 MiB read chunks, never the 20 MiB line


JUNK = [None, True, 0, -1, 1.5, float("nan"), "", "x", "1e999", [], [1, "a"], {"a": 1}, "x" * 10_000, -10 ** 30]


def _bases(tmp_path):
    from bge_ray.tools.config import MineConfig, ScoreConfig

    out = str(tmp_path / "out")
    return [
        (FinetuneConfig, {"model_name_or_path": minilm_path(), "train_data": [FE_EXAMPLES], "output_dir": out}),
        (MineConfig, {"input_file": [FE_EXAMPLES], "output_dir": out, "embedder_name_or_path": minilm_path()}),
        (ScoreConfig, {"input_file": [FE_EXAMPLES], "output_dir": out, "embedder_name_or_path": minilm_path()}),
    ]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["train", "mine", "score"])
def test_junk_config_values_are_config_errors_never_crashes(tmp_path, which):
    """Random junk in random fields: a ConfigError that names the field, or a config that validates."""
    cls, base = _bases(tmp_path)[which]
    fields = [f for f in cls.__dataclass_fields__ if f not in base]
    rng = random.Random(1234 + which)
    errors = 0
    for _ in range(300):
        picked = rng.sample(fields, rng.randint(1, 3))
        values = dict(base, **{f: rng.choice(JUNK) for f in picked})
        try:
            resolve_config(values, cls)
        except ConfigError as e:
            errors += 1
            assert any(f in str(e) for f in picked), (values, str(e))
    assert errors > 200  # junk is nearly always refused


def _unsafe_model_dir(path, marker):
    """A model directory whose only weights file is a pickle that runs code when unpickled."""
    from transformers import BertConfig

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    os.makedirs(path)
    BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(path)
    torch.save({"embeddings.word_embeddings.weight": Payload()}, os.path.join(path, "pytorch_model.bin"))
    return str(path)


def test_model_weights_are_never_unpickled_from_untrusted_files(tmp_path):
    from bge_ray.model.embedder import Embedder

    marker = str(tmp_path / "pwned")
    model_dir = _unsafe_model_dir(tmp_path / "model", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        Embedder.from_pretrained(model_dir)
    assert not os.path.exists(marker)


def test_remote_code_stays_off_unless_asked_for(tmp_path):
    from bge_ray.model.embedder import Embedder

    marker = tmp_path / "ran"
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    (model_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                           "AutoModel": "modeling_evil.EvilModel"}}))
    with pytest.raises(Exception, match="trust_remote_code"):
        Embedder.from_pretrained(str(model_dir))
    assert not marker.exists()
