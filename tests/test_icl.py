"""In-context examples (``icl``), as FlagEmbedding's decoder_only.icl runner trains bge-en-icl: the batch's
queries and passages to the token, the settings it reads and refuses, its example script moved over
unchanged, and a fine-tune through Ray Train + DeepSpeed."""

from __future__ import annotations

import json
import os
import random
import shlex

import numpy as np
import pyarrow as pa
import pytest

from bge_ray.config import load_config
from bge_ray.data.collate import GroupCollator
from bge_ray.data.icl import EXAMPLE_CHOICES, IclCollator, model_queries, tokenize_icl_rows
from bge_ray.data.pipeline import numpy_batch
from bge_ray.data.text import TextSpec
from bge_ray.data.triplets import ROW_SCHEMA
from bge_ray.errors import ConfigError, DataValidationError
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.encode import encoder_spec_for
from bge_ray.train.launch import check_model
from tests.flagembedding_compat import import_flag_model
from tests.helpers import FE_EXAMPLE_DATA, build_tiny_decoder
from tests.test_migration import decoder_base_args, fe_train_data

TOKENS = ("<instruct>", "<query>", "<response>")
SUFFIX = "\n<response>"
FILES = {"retrieval": "retrieval/msmarco.jsonl", "sts": "sts/sts.jsonl",
         "clustering": "clustering-no_in_batch_neg/arXiv_title.jsonl",
         "classification": "classification-no_in_batch_neg/Banking77Classification.jsonl"}


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("tiny_decoder")))


class Draws:
    """``random``'s ``choice`` and ``sample`` as FlagEmbedding's icl dataset calls them, scripted: the
    example counts and picks drawn once (given alike to FlagEmbedding and bge-ray); a row's positive and
    negatives taken in order (bge-ray's rows arrive with their group drawn)."""

    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.counts = [rng.choice(EXAMPLE_CHOICES) for _ in range(n)]
        self.picks = [rng.sample(range(n), min(c + 1, n)) for c in self.counts if c]
        self.examples = False

    def choice(self, seq):
        seq = list(seq)
        if seq == list(EXAMPLE_CHOICES):
            count = self.counts.pop(0)
            self.examples = count > 0
            return count
        return seq[0]

    def sample(self, population, k):
        if self.examples:
            self.examples = False
            return list(self.picks.pop(0))
        return list(population)[:k]


def icl_args(tmp_path, **extra) -> dict:
    return {"train_data": [os.path.join(FE_EXAMPLE_DATA, f) for f in FILES.values()], "output_dir": str(tmp_path / "o"),
            "same_dataset_within_batch": True, "icl": True, "query_max_len": 760, "passage_max_len": 40,
            "train_group_size": 3, "example_query_max_len": 40, "example_passage_max_len": 60,
            "icl_suffix_str": SUFFIX, "query_instruction_format": "<instruct>{}\n<query>{}",
            "query_instruction_for_retrieval": "Given a query, retrieve passages that are relevant to the query.",
            "additional_special_tokens": list(TOKENS), **extra}


def flagembedding_batch(path: str, tok, args: dict, draws: Draws, n: int) -> tuple[list[str], list[str]]:
    """FlagEmbedding 1.4.2's icl dataset's queries and passages for the first ``n`` rows of ``path``."""
    import_flag_model()
    from FlagEmbedding.finetune.embedder.decoder_only.icl import dataset as fe_dataset
    from FlagEmbedding.finetune.embedder.decoder_only.icl.arguments import DecoderOnlyEmbedderICLDataArguments

    keys = ("query_max_len", "passage_max_len", "train_group_size", "example_query_max_len", "example_passage_max_len",
            "icl_suffix_str", "query_instruction_format", "query_instruction_for_retrieval", "retrieval_use_examples")
    data_args = DecoderOnlyEmbedderICLDataArguments(train_data=[path], same_dataset_within_batch=True,
                                                    **{k: args[k] for k in keys if k in args})
    ds = fe_dataset.DecoderOnlyEmbedderICLSameDatasetTrainDataset(data_args, default_batch_size=n, seed=1, tokenizer=tok)
    saved, fe_dataset.random = fe_dataset.random, draws
    try:
        queries, passages, _ = ds._create_batch_data(ds.dataset[0:n])
    finally:
        fe_dataset.random = saved
    return queries, passages


def our_rows(path: str, n: int, group_size: int) -> pa.Table:
    """The first ``n`` rows of ``path`` as bge-ray's stream carries them: the group drawn (first positive,
    first negatives, as :class:`Draws` has FlagEmbedding take them)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            row = json.loads(line)
            keep = 2 if row.get("type") == "only_1neg" else group_size
            if row.get("type") == "symmetric_class":
                keep = min(len(row["neg"]) + 1, group_size)
            rows.append({"query": row["query"], "pos": row["pos"][:1], "neg": row["neg"][:keep - 1],
                         "prompt": row.get("prompt"), "type": row.get("type"), "category": row.get("category"),
                         "source": f"{path}:{line_no}", "row_key": line_no})
            if len(rows) == n:
                break
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("retrieval_use_examples", [True, False])
def test_a_batch_is_built_as_flagembeddings_icl_runner_builds_it(tiny_decoder, tmp_path, kind, retrieval_use_examples):
    """Every query (instruction, 0-5 examples of the batch's other rows, cut, suffix) and every passage
    (symmetric ones cut, with the suffix) as FlagEmbedding makes them, and the same token ids after."""
    args = icl_args(tmp_path, retrieval_use_examples=retrieval_use_examples)
    cfg = load_config(None, {"model_name_or_path": tiny_decoder, **args})
    spec, tok = TextSpec.from_config(cfg), load_tokenizer(tiny_decoder, special_tokens=TOKENS)
    path, n = os.path.join(FE_EXAMPLE_DATA, FILES[kind]), 8
    fe_queries, fe_passages = flagembedding_batch(path, tok, args, Draws(n, seed=5), n)
    batch = numpy_batch(tokenize_icl_rows(our_rows(path, n, cfg.train_group_size), spec))
    collator = IclCollator(GroupCollator(None, tok.pad_token_id, "left"), tok, spec, cfg.seed)
    queries = collator.query_texts(batch, Draws(n, seed=5))
    assert queries == fe_queries
    with_examples = [q for q in queries if q.count("<instruct>") > 1]
    assert bool(with_examples) == (retrieval_use_examples or kind != "retrieval")  # the draws do give examples
    assert all(q.endswith(SUFFIX) for q in queries)
    ours = [list(ids) for pos, neg in zip(batch["pos_ids"], batch["neg_ids"], strict=True) for ids in [*pos, *neg]]
    assert ours == tok(fe_passages, truncation=True, max_length=cfg.passage_max_len)["input_ids"]
    assert all(p.endswith(SUFFIX) for p in fe_passages) == (kind in ("sts", "clustering"))


def test_the_worker_draws_a_batchs_examples_from_its_rows_alike_on_every_run(tiny_decoder, tmp_path):
    cfg = load_config(None, {"model_name_or_path": tiny_decoder, **icl_args(tmp_path)})
    spec, tok = TextSpec.from_config(cfg), load_tokenizer(tiny_decoder, special_tokens=TOKENS)
    table = tokenize_icl_rows(our_rows(os.path.join(FE_EXAMPLE_DATA, FILES["retrieval"]), 8, 3), spec)
    collator = IclCollator(GroupCollator(3, tok.pad_token_id, "left"), tok, spec, cfg.seed)
    first, again = collator(numpy_batch(table)), collator(numpy_batch(table))
    assert np.array_equal(first["q_input_ids"], again["q_input_ids"])
    other = collator(numpy_batch(table.take(list(range(7, -1, -1)))))  # other rows (order): other draws
    assert not np.array_equal(first["q_input_ids"], other["q_input_ids"][::-1])
    assert first["p_input_ids"].shape[0] == 8 * 3 and (first["q_input_ids"][:, -1] == tok.eos_token_id).all()


def test_teacher_scores_of_an_icl_batch_reach_the_loss_with_their_passages(tiny_decoder, tmp_path):
    """knowledge_distillation (FlagEmbedding's icl script turns it on): each row's drawn scores, positive first."""
    cfg = load_config(None, {"model_name_or_path": tiny_decoder, **icl_args(tmp_path, knowledge_distillation=True)})
    spec, tok = TextSpec.from_config(cfg), load_tokenizer(tiny_decoder, special_tokens=TOKENS)
    rows = our_rows(os.path.join(FE_EXAMPLE_DATA, FILES["retrieval"]), 4, 3).to_pylist()
    for n, row in enumerate(rows):
        row.update(pos_scores=[float(n)], neg_scores=[n + 0.5, n + 0.25])
    table = tokenize_icl_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), spec)
    collator = IclCollator(GroupCollator(3, tok.pad_token_id, "left", knowledge_distillation=True), tok, spec, cfg.seed)
    out = collator(numpy_batch(table))
    np.testing.assert_array_equal(out["teacher_scores"], [[n, n + 0.5, n + 0.25] for n in range(4)])
    assert out["p_input_ids"].shape[0] == 4 * 3


def test_a_clustering_row_without_its_category_is_named(tiny_decoder, tmp_path):
    cfg = load_config(None, {"model_name_or_path": tiny_decoder, **icl_args(tmp_path)})
    rows = our_rows(os.path.join(FE_EXAMPLE_DATA, FILES["clustering"]), 3, 3).to_pylist()
    rows[1]["category"] = None
    with pytest.raises(DataValidationError, match=r"arXiv_title.jsonl:2: a symmetric_clustering row needs its 'category'"):
        tokenize_icl_rows(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), TextSpec.from_config(cfg))


def test_an_icl_models_queries_end_with_its_suffix_in_validation_and_eval(tiny_decoder, tmp_path):
    """Without examples: cut to leave room for BOS, suffix and EOS, then the suffix; other models' unchanged."""
    cfg = load_config(None, {"model_name_or_path": tiny_decoder, **icl_args(tmp_path, query_max_len=24)})
    spec, tok = TextSpec.from_config(cfg), load_tokenizer(tiny_decoder, special_tokens=TOKENS)
    long = "vitamin d deficiency " * 20
    short, cut = model_queries(tok, spec, ["cells", long])
    assert short == "cells" + SUFFIX and cut.endswith(SUFFIX) and len(cut) < len(long)
    assert len(tok(cut)["input_ids"]) <= 24 and tok(cut)["input_ids"][-1] == tok.eos_token_id
    assert model_queries(tok, spec.replace(icl_suffix=None), ["cells"]) == ["cells"]


@pytest.mark.parametrize(("extra", "match"), [
    ({"icl": False}, "example_query_max_len, example_passage_max_len, icl_suffix_str: in-context example settings "
                     "without icl"),
    ({"same_dataset_within_batch": False}, "icl draws a query's examples from its batch"),
    ({"example_query_max_len": 0}, "example_query_max_len must be >= 1"),
])
def test_icl_settings_that_cannot_work_are_refused(tiny_decoder, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"model_name_or_path": tiny_decoder, **icl_args(tmp_path, **extra)})


def test_flagembeddings_icl_script_moves_over_with_icl_added(tiny_decoder, tmp_path):
    """examples/finetune/embedder/decoder_only/icl_same_dataset.sh: its data and example flags, plus --icl
    (the runner's name is not a flag); without --icl its example flags are refused, not dropped."""
    script = shlex.split(f"""
        --train_data {fe_train_data()} --same_dataset_within_batch True --small_threshold 0 --drop_threshold 0
        --example_query_max_len 256 --example_passage_max_len 256 --retrieval_use_examples True
        --icl_suffix_str '\\n<response>' --additional_special_tokens '<instruct>' '<query>' '<response>'""")
    base = decoder_base_args(tiny_decoder, str(tmp_path / "out"), str(tmp_path / "c"), lora=False)
    base = base[:base.index("--query_max_len")] + ["--query_max_len", "2048"] + base[base.index("--query_max_len") + 2:]
    cfg = check_model(load_config(None, base + script + ["--icl"]))
    assert (cfg.icl, cfg.example_query_max_len, cfg.example_passage_max_len, cfg.icl_suffix_str) == (
        True, 256, 256, "\\n<response>")
    assert TextSpec.from_config(cfg).icl_suffix == "\\n<response>" and cfg.use_lora
    with pytest.raises(ConfigError, match="add icl: true"):
        load_config(None, base + script)


def test_icl_finetune_on_two_workers_trains_and_its_export_reads_queries_with_the_suffix(ray_cluster, tiny_decoder,
                                                                                         tmp_path):
    """Multi-task data (retrieval, sts, clustering) with examples in its batches, 2 workers, ZeRO-2 and
    LoRA; validation and `bge-ray eval` read queries with the suffix the model was trained with."""
    import bge_ray
    from tests.helpers import make_beir_subset

    args = icl_args(tmp_path, query_max_len=600, per_device_train_batch_size=2, max_steps=2, num_workers=2,
                    deepspeed="zero2", learning_rate=1e-3, lora_rank=4, logging_steps=1, storage_path=str(tmp_path / "s"),
                    eval_data=make_beir_subset(str(tmp_path / "beir"), n_queries=6, n_extra_docs=20), eval_steps=2,
                    final_model="last", train_data=[os.path.join(FE_EXAMPLE_DATA, FILES[k])
                                                    for k in ("retrieval", "sts", "clustering")])
    result = bge_ray.finetune(load_config(None, {"model_name_or_path": tiny_decoder, **args}))
    assert result.metrics["step"] == 2 and "eval_ndcg@10" in result.metrics and result.config.icl
    with open(os.path.join(result.model_dir, "bge_ray.json"), encoding="utf-8") as f:
        assert json.load(f)["training_config"]["icl_suffix_str"] == SUFFIX
    assert encoder_spec_for(result.model_dir).text.icl_suffix == SUFFIX
    with open(os.path.join(result.model_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "FlagICLModel(model_dir" in card and "every query ends with `'\\n<response>'`" in card
