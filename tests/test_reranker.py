"""Reranker fine-tuning (``task: reranker``, ``bge-ray train-reranker``): pairs tokenized as FlagEmbedding's
reranker data set does, the loss and its gradients equal to FlagEmbedding 1.4.2's ``CrossEncoderModel``
(float64, with and without teacher scores), its runner's flags moved over unchanged or refused with the
reason, and a 2-worker Ray Train + DeepSpeed run whose export sentence-transformers' ``CrossEncoder`` and
FlagEmbedding's ``FlagReranker`` load with the scores bge-ray's own model gives."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import types

import numpy as np
import pytest
import torch

from bge_ray.config import compat, load_config
from bge_ray.config.fields import field_hints
from bge_ray.config.finetune import RerankerConfig
from bge_ray.data.collate import PairCollator, pad_ids
from bge_ray.data.pairs import LLM_PROMPT, llm_pair_inputs, pair_inputs, tokenize_pairs, training_pairs
from bge_ray.data.text import TextSpec
from bge_ray.errors import ConfigError
from bge_ray.model.reranker import Reranker, rerank_loss, reranker_config
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.rerank import PairScorer, RerankSpec
from bge_ray.tools.config import ScoreConfig
from bge_ray.train.launch import check_model
from tests.flagembedding_compat import import_flag_model
from tests.helpers import FE_DS_STAGE0, FE_EXAMPLES


def _rows() -> list[dict]:
    with open(FE_EXAMPLES, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(("query_max_len", "passage_max_len"), [(32, 128), (16, 32), (24, 64)])
def test_pairs_are_tokenized_as_flagembeddings_reranker_data_set(tiny_model, query_max_len, passage_max_len):
    import_flag_model()
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerTrainDataset

    tok = load_tokenizer(tiny_model)
    fe = AbsRerankerTrainDataset.__new__(AbsRerankerTrainDataset)  # its pair builder, without its file loading
    fe.args, fe.tokenizer = types.SimpleNamespace(query_max_len=query_max_len, passage_max_len=passage_max_len), tok
    pairs = [(r["query"], p) for r in _rows() for p in r["pos"] + r["neg"]]
    ours = training_pairs(tok, [q for q, _ in pairs], [p for _, p in pairs], query_max_len, passage_max_len)
    cut = 0
    for i, (q, p) in enumerate(pairs):
        want = fe.create_one_example(q, p)
        assert ours["input_ids"][i] == want["input_ids"], i
        assert ours["token_type_ids"][i] == want["token_type_ids"], i
        cut += len(want["input_ids"]) == query_max_len + passage_max_len
    assert cut > 0  # some pairs were cut to the budget, so truncation was compared too


def test_a_batch_of_rows_becomes_groups_of_pairs_with_instructions_and_teacher_scores(tiny_model):
    import pyarrow as pa

    spec = TextSpec(tokenizer=tiny_model, query_max_len=16, passage_max_len=24, query_instruction="Q: ",
                    passage_instruction="P: ", pairs=True)
    table = pa.table({"query": ["rain", "sun"], "pos": [["water falls"], ["light"]],
                      "neg": [["dry", "sand"], ["dark", "night"]], "query_prompt": [None, "Ask: "],
                      "passage_prompt": [None, "Doc: "], "pos_scores": [[0.9], [0.8]],
                      "neg_scores": [[0.1, 0.2], [0.3, 0.0]], "row_key": [7, 8]})
    out = tokenize_pairs(table, spec)
    tok = load_tokenizer(tiny_model)
    assert tok.decode(out.column("pos_ids")[0][0].as_py(), skip_special_tokens=True) == "q : rain p : water falls"
    assert tok.decode(out.column("neg_ids")[1][1].as_py(), skip_special_tokens=True) == "ask : sun doc : night"
    batch = {name: np.array(out.column(name).to_pylist() + [None], dtype=object)[:-1] for name in out.column_names}
    inputs = PairCollator(group_size=3, pad_token_id=tok.pad_token_id, pad_to_multiple_of=8,
                          knowledge_distillation=True)(batch)
    assert inputs["input_ids"].shape[0] == 6 and inputs["input_ids"].shape[1] % 8 == 0
    assert inputs["token_type_ids"].shape == inputs["input_ids"].shape
    assert inputs["token_type_ids"][0].max() == 1  # the passage's tokens are the second segment
    np.testing.assert_allclose(inputs["teacher_scores"], [[0.9, 0.1, 0.2], [0.8, 0.3, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="not a sampled group of 4"):
        PairCollator(group_size=4, pad_token_id=0)(batch)


def _classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=1)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).double()


@pytest.mark.parametrize("teacher", [False, True])
def test_loss_and_gradients_equal_flagembeddings_cross_encoder(teacher):
    import_flag_model()
    from FlagEmbedding.finetune.reranker.encoder_only.base import CrossEncoderModel

    batch, group = 3, 4
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 40, (batch * group, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1::3, 6:] = 0
    types_ = (torch.arange(10) >= 4).long().expand_as(ids).clone()
    scores = torch.randn(batch * group, generator=gen, dtype=torch.float64)
    fe_model = _classifier()
    # FlagEmbedding's model asks its tokenizer for the id of "Yes" (used only by LLM rerankers)
    tokenizer = type("Tok", (), {"pad_token_id": 0, "__call__": lambda self, *a, **k: {"input_ids": [0]}})()
    fe = CrossEncoderModel(fe_model, tokenizer=tokenizer, train_batch_size=batch)
    fe.train()
    out = fe(pair={"input_ids": ids, "attention_mask": mask, "token_type_ids": types_},
             teacher_scores=scores.tolist() if teacher else None)
    out.loss.backward()
    ours = Reranker(_classifier()).train()
    loss = rerank_loss(ours(ids, mask, types_), group, scores.view(batch, group) if teacher else None)
    loss.backward()
    rtol = 1e-6 if teacher else 1e-12  # FlagEmbedding makes the teacher's softmax in float32 (torch.Tensor(...))
    assert float(loss.detach()) == pytest.approx(float(out.loss.detach()), rel=rtol)
    for (name, a), (_, b) in zip(fe_model.named_parameters(), ours.model.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=rtol * 1e-2, msg=name)
    if teacher:  # the teacher's term is there: the loss differs from the hard one
        assert float(loss.detach()) != pytest.approx(float(rerank_loss(ours(ids, mask, types_).detach(), group)))


def test_a_new_classification_head_is_drawn_from_the_seed_alike_on_every_worker(tiny_model):
    torch.manual_seed(1)
    a = Reranker.from_pretrained(tiny_model, seed=3)
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = Reranker.from_pretrained(tiny_model, seed=3)
    c = Reranker.from_pretrained(tiny_model, seed=4)
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    torch.manual_seed(1)
    Reranker.from_pretrained(tiny_model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left as it was


# ---- the runner's flags ----------------------------------------------------------------------------

def reranker_base_args(model: str, out: str, cache: str) -> list[str]:
    """examples/finetune/reranker/encoder_only/base.sh's arguments, data and paths pointed at vendored copies."""
    return shlex.split(f"""
    --model_name_or_path {model} --cache_dir {cache}
    --train_data {FE_EXAMPLES} --cache_path {cache} --train_group_size 8 --query_max_len 256
    --passage_max_len 256 --pad_to_multiple_of 8 --knowledge_distillation True
    --output_dir {out} --overwrite_output_dir --learning_rate 6e-5 --fp16 --num_train_epochs 4
    --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --dataloader_drop_last True
    --warmup_ratio 0.1 --gradient_checkpointing --weight_decay 0.01 --deepspeed {FE_DS_STAGE0}
    --logging_steps 1 --save_steps 1000
    """)


def test_every_argument_of_flagembeddings_reranker_runner_is_handled():
    import_flag_model()
    from FlagEmbedding.abc.finetune.reranker import (
        AbsRerankerDataArguments,
        AbsRerankerModelArguments,
        AbsRerankerTrainingArguments,
    )

    hints = field_hints(RerankerConfig)
    for cls in (AbsRerankerModelArguments, AbsRerankerDataArguments, AbsRerankerTrainingArguments):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        assert [n for n in names if n not in hints and not compat.RERANK.known(n)] == [], cls.__name__


def test_encoder_reranker_script_parses_unchanged(tiny_model, tmp_path, capsys):
    cfg = load_config(None, reranker_base_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "c")), RerankerConfig)
    assert capsys.readouterr().err == ""  # every flag is a field or at the value bge-ray runs as
    assert (cfg.task, cfg.knowledge_distillation, cfg.query_max_len, cfg.fp16) == ("reranker", True, 256, True)
    load_config(None, [*reranker_base_args(tiny_model, str(tmp_path / "out"), str(tmp_path / "c")), "--max_len", "512"],
                RerankerConfig)
    err = capsys.readouterr().err
    assert "--max_len has no effect here: FlagEmbedding's reranker runner does not read it" in err


def test_what_a_reranker_cannot_use_is_refused_with_the_reason(tiny_model, tmp_path):
    base = {"model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="temperature, sentence_pooling_method: embedder settings in a reranker run"):
        load_config(None, {**base, "temperature": 0.05, "sentence_pooling_method": "mean"}, RerankerConfig)
    with pytest.raises(ConfigError, match="query_instruction_for_retrieval.*use query_instruction_for_rerank"):
        load_config(None, {**base, "query_instruction_for_retrieval": "q: "}, RerankerConfig)
    with pytest.raises(ConfigError, match="reranks what an embedder retrieves: set eval_retriever"):
        load_config(None, {**base, "eval_data": str(tmp_path)}, RerankerConfig)
    with pytest.raises(ConfigError, match="eval_retriever is set but eval_data is not"):
        load_config(None, {**base, "eval_retriever": tiny_model}, RerankerConfig)
    with pytest.raises(ConfigError, match="eval_retriever: reranker settings in an embedder run"):
        load_config(None, {**base, "eval_retriever": tiny_model})
    with pytest.raises(ConfigError, match="reranker settings in an embedder run"):
        load_config(None, {**base, "query_instruction_for_rerank": "q: "})
    with pytest.raises(ConfigError, match="train an embedder with bge-ray train"):
        load_config(None, {**base, "task": "embedder"}, RerankerConfig)
    with pytest.raises(ConfigError, match="config_name .*model's own config"):
        load_config(None, {**base, "config_name": "other"}, RerankerConfig)
    with pytest.raises(ConfigError, match="with train_group_size 1 it is 0 and nothing trains"):
        load_config(None, {**base, "train_group_size": 1}, RerankerConfig)
    with pytest.raises(ConfigError, match="passage_max_len must be at least 8"):
        load_config(None, {**base, "passage_max_len": 4}, RerankerConfig)
    assert load_config(None, {**base, "task": "reranker"}).task == "reranker"  # bge-ray train takes the field too
    assert load_config(None, {**base, "sub_batch_size": -1}, RerankerConfig).sub_batch_size == -1  # GradCache off


def test_a_decoder_only_model_is_refused_before_ray(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2 model, not an encoder.*decoder-only rerankers"):
        reranker_config(str(tmp_path))


# ---- a fine-tune through Ray Train + DeepSpeed -------------------------------------------------------

def test_reranker_finetune_exports_a_model_crossencoder_and_flagreranker_score_alike(ray_cluster, tiny_model, tmp_path):
    """Two workers, ZeRO-2, teacher scores, gradient checkpointing, instructions, validation reranking a
    retriever's top 5: the model trains, validation measures what reranking in one process measures, and
    the export scores pairs in sentence-transformers and FlagEmbedding as bge-ray's own model does."""
    import bge_ray
    from bge_ray.retrieval.metrics import evaluate_run
    from tests.helpers import make_beir_subset
    from tests.test_evaluation import in_process_search

    rows = _rows()[:24]
    data = tmp_path / "scored.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**r, "pos_scores": [1.0] * len(r["pos"]),
                                "neg_scores": [((i + j) % 5) / 5 for j in range(len(r["neg"]))]}) + "\n")
    beir = make_beir_subset(str(tmp_path / "beir"), n_queries=6, n_extra_docs=20)
    retriever = shutil.copytree(tiny_model, tmp_path / "retriever")  # mean pooling: cls of a random BERT ties
    (retriever / "bge_ray.json").write_text(json.dumps({"sentence_pooling_method": "mean", "normalize_embeddings": True}))
    cfg = load_config(None, {
        "model_name_or_path": tiny_model, "train_data": [str(data)], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero2",
        "per_device_train_batch_size": 2, "train_group_size": 4, "query_max_len": 16, "passage_max_len": 32,
        "knowledge_distillation": True, "gradient_checkpointing": True, "learning_rate": 1e-3, "max_steps": 3,
        "logging_steps": 1, "seed": 5, "query_instruction_for_rerank": "Q: ", "eval_data": beir,
        "eval_retriever": str(retriever), "eval_rerank_top_k": 5, "eval_steps": 2, "final_model": "last"}, RerankerConfig)
    result = bge_ray.finetune(cfg)
    assert result.metrics["step"] == 3
    # validation reranked the retriever's top 5 at steps 0, 2 and 3: the last equals reranking in this process
    assert [e["step"] for e in result.evals] == [0, 2, 3]
    found = in_process_search(beir, tiny_model, pooling="mean")
    assert result.metrics["retriever_ndcg@10"] == pytest.approx(
        evaluate_run(found["dataset"].qrels, found["run"], (10,))["ndcg@10"], abs=1e-6)
    tok, final = load_tokenizer(result.model_dir), Reranker.from_pretrained(result.model_dir).eval()
    run = {}
    for q, docs in found["run"].items():
        top = sorted(docs, key=docs.get, reverse=True)[:5]
        enc = training_pairs(tok, ["Q: " + found["dataset"].queries[q]] * 5, [found["texts"][d] for d in top], 16, 32)
        with torch.no_grad():
            for d, ids, types_ in zip(top, enc["input_ids"], enc["token_type_ids"], strict=True):
                run.setdefault(q, {})[d] = float(final(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                                       torch.tensor([types_])))
    assert result.evals[-1]["eval_ndcg@10"] == pytest.approx(evaluate_run(found["dataset"].qrels, run, (10,))["ndcg@10"],
                                                             abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in result.history if r.get("kind") == "train")
    start = Reranker.from_pretrained(tiny_model, seed=5).model.state_dict()
    trained = Reranker.from_pretrained(result.model_dir).eval()
    for name in ("classifier.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert not torch.equal(trained.model.state_dict()[name], start[name]), name  # trained, head included
    with open(os.path.join(result.model_dir, "bge_ray.json")) as f:
        assert json.load(f)["task"] == "reranker"
    pairs = [["Q: " + r["query"], r["pos"][0]] for r in rows[:3]] + [["Q: " + rows[0]["query"], rows[0]["neg"][0]]]
    tok = load_tokenizer(result.model_dir)
    enc = tok([q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = trained(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).numpy()
    import_flag_model()
    from FlagEmbedding import FlagReranker
    from sentence_transformers import CrossEncoder

    fe = FlagReranker(result.model_dir, use_fp16=False, devices="cpu")
    np.testing.assert_allclose(fe.compute_score(pairs), logits, rtol=1e-5, atol=1e-5)
    st = CrossEncoder(result.model_dir, device="cpu")
    np.testing.assert_allclose(st.predict(pairs), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    assert len({round(float(x), 4) for x in logits}) > 1
    with open(os.path.join(result.model_dir, "README.md")) as f:
        card = f.read()
    assert "CrossEncoder(model_dir)" in card and "FlagReranker(model_dir)" in card and "temperature" not in card
    assert "retriever alone" in card


# ---- reranking in evaluation ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory, tiny_model) -> str:
    path = str(tmp_path_factory.mktemp("tiny_reranker"))
    Reranker.from_pretrained(tiny_model, seed=2).model.save_pretrained(path)
    load_tokenizer(tiny_model).save_pretrained(path)
    return path


def test_pairs_score_as_flagreranker_scores_them(tiny_reranker):
    from bge_ray.retrieval.rerank import rerank_spec_for

    import_flag_model()
    from FlagEmbedding import FlagReranker

    pairs = [[r["query"], p] for r in _rows()[:6] for p in r["pos"] + r["neg"][:2]]
    fe = FlagReranker(tiny_reranker, use_fp16=False, devices="cpu", batch_size=4)
    for options in ({"max_length": 40}, {"max_length": 64, "query_max_length": 10}):
        scorer = PairScorer(rerank_spec_for(tiny_reranker, batch_size=4, **options), torch.device("cpu"))
        got = scorer([q for q, _ in pairs], [p for _, p in pairs])
        want = fe.compute_score(pairs, max_length=options["max_length"], query_max_length=options.get("query_max_length"))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len({round(float(x), 5) for x in got}) > 1


def test_a_rerankers_trained_instructions_are_its_defaults(tiny_reranker, tmp_path):
    from bge_ray.retrieval.encode import encoder_spec_for
    from bge_ray.retrieval.rerank import rerank_spec_for

    assert rerank_spec_for(tiny_reranker).query_instruction is None
    with open(os.path.join(tmp_path, "bge_ray.json"), "w") as f:
        json.dump({"task": "reranker", "query_instruction_for_rerank": "Q: ", "query_instruction_format": "{}{}",
                   "passage_instruction_for_rerank": None, "passage_instruction_format": "{}{}",
                   "query_max_len": 16, "passage_max_len": 32}, f)
    spec = rerank_spec_for(str(tmp_path))
    assert spec.query_instruction == "Q: "
    # pairs cut as in training, unless a length is asked for (then FlagReranker's rule)
    tok = load_tokenizer(tiny_reranker)
    queries, passages = zip(*[(r["query"], p) for r in _rows()[:8] for p in r["neg"][:2]], strict=True)
    assert pair_inputs(tok, list(queries), list(passages), spec.query_tokens, spec.passage_tokens,
                       spec.max_length) == training_pairs(tok, list(queries), list(passages), 16, 32)
    asked = rerank_spec_for(str(tmp_path), max_length=40)
    assert (asked.query_tokens, asked.passage_tokens, asked.max_length) == (30, 40, 40)
    with pytest.raises(ConfigError, match="is a reranker .*not an embedder"):
        encoder_spec_for(str(tmp_path))
    assert rerank_spec_for(str(tmp_path), query_instruction="Other: ").query_instruction == "Other: "
    with pytest.raises(ConfigError, match="reranker_query_max_length must be between"):
        rerank_spec_for(str(tmp_path), max_length=32, query_max_length=40)


def test_eval_reranks_each_querys_top_k_as_flagreranker_scores_it(ray_cluster, tiny_model, tiny_reranker, tmp_path):
    from bge_ray.retrieval.evaluate import evaluate
    from bge_ray.retrieval.metrics import evaluate_run
    from tests.helpers import make_beir_subset
    from tests.test_evaluation import in_process_search

    beir = make_beir_subset(str(tmp_path / "beir"), n_queries=8, n_extra_docs=30)
    dense, reranked = evaluate([tiny_model], beir, ks=(1, 10), pooling="mean", concurrency=2, reranker=tiny_reranker,
                               rerank_top_k=5, reranker_options={"max_length": 48})
    assert (dense["mode"], reranked["mode"], reranked["reranker"], reranked["rerank_top_k"]) == (
        "dense", "rerank", tiny_reranker, 5)
    found = in_process_search(beir, tiny_model)
    import_flag_model()
    from FlagEmbedding import FlagReranker

    fe = FlagReranker(tiny_reranker, use_fp16=False, devices="cpu")
    run = {}
    for q, docs in found["run"].items():
        top = sorted(docs, key=docs.get, reverse=True)[:5]
        scores = fe.compute_score([[found["dataset"].queries[q], found["texts"][d]] for d in top], max_length=48)
        run[q] = dict(zip(top, map(float, scores), strict=True))
    want = evaluate_run(found["dataset"].qrels, run, (1, 10))
    for key in ("ndcg@10", "recall@10", "mrr@10", "precision@1"):
        assert reranked[key] == pytest.approx(want[key], abs=1e-6), key
    assert reranked["recall@10"] <= evaluate_run(found["dataset"].qrels, found["run"], (5,))["recall@5"] + 1e-9


def test_reranker_options_without_a_reranker_are_refused(capsys):
    from bge_ray.cli import main

    assert main(["eval", "--model", "m", "--data", "d", "--rerank_top_k", "20"]) == 2
    assert "--rerank_top_k: reranker settings without --reranker" in capsys.readouterr().err


def test_train_reranker_command_has_its_help_and_needs_a_config(capsys):
    from bge_ray.cli import main

    assert main(["train-reranker", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bge-ray train-reranker") and "--query_instruction_for_rerank" in out
    assert main(["train-reranker"]) == 2  # no quickstart for rerankers: refused, nothing started
    assert "bge-ray train-reranker needs a config" in capsys.readouterr().err
    assert main(["train-reranker", "--model_name_or_path", "m", "--train_data", FE_EXAMPLES, "--output_dir", "o",
                 "--temperature", "0.1"]) == 2
    assert "temperature: embedder settings in a reranker run" in capsys.readouterr().err


# ---- decoder-only (LLM) rerankers: scoring ---------------------------------------------------------

LLM_PAIRS = [("vitamin d deficiency", "Bone loss in the elderly is often linked to low vitamin d levels in blood."),
             ("protein folding", "cells"), ("a", "b c d e f g h i j k l m n o p q r s t u v w x y z " * 5)]


@pytest.mark.parametrize(("max_length", "batch_size", "options"), [
    (512, 3, {}),  # add_reranker_score's defaults: no instructions, FlagEmbedding's prompt
    (24, 2, {"query_instruction": "A: ", "passage_instruction": "B: ", "prompt": "Relevant?"}),  # passages cut
    (40, 1, {"query_instruction": "A: ", "query_max_length": 6}),  # the query cut too
])
def test_an_llm_reranker_scores_as_flagllmreranker(tiny_llm_reranker, max_length, batch_size, options):
    """The pair (BOS, query, newline, passage, newline, prompt) cut and scored by the next token's "Yes"
    logit as FlagEmbedding 1.4.2's FlagLLMReranker does, whatever the batch's padding."""
    import_flag_model()
    from FlagEmbedding import FlagLLMReranker

    fe = FlagLLMReranker(tiny_llm_reranker, use_fp16=False, devices="cpu", max_length=max_length, batch_size=batch_size,
                         query_instruction_for_rerank=options.get("query_instruction"),
                         passage_instruction_for_rerank=options.get("passage_instruction"),
                         prompt=options.get("prompt"), query_max_length=options.get("query_max_length"))
    want = np.array(fe.compute_score([list(p) for p in LLM_PAIRS]))
    scorer = PairScorer(RerankSpec(model=tiny_llm_reranker, max_length=max_length, batch_size=batch_size, **options),
                        torch.device("cpu"))
    assert scorer.kind == "llm"
    got = scorer([q for q, _ in LLM_PAIRS], [p for _, p in LLM_PAIRS])
    np.testing.assert_allclose(got, want, atol=1e-6)
    alone = [scorer([q], [p])[0] for q, p in LLM_PAIRS]  # a pair's score does not depend on its batch
    np.testing.assert_allclose(got, alone, atol=1e-6)
    assert len({round(float(x), 5) for x in got}) == 3


def test_what_an_llm_reranker_scorer_cannot_use_is_refused_before_ray(tiny_reranker, tiny_llm_reranker, tmp_path):
    from bge_ray.tools.score import score

    with pytest.raises(ConfigError, match="prompt is read by decoder-only .* cross-encoder"):
        score(input_file=[FE_EXAMPLES], output_dir=str(tmp_path / "a"), reranker_name_or_path=tiny_reranker,
              prompt="Relevant?")
    layerwise = shutil.copytree(tiny_llm_reranker, tmp_path / "layerwise")
    config = json.loads((layerwise / "config.json").read_text())
    (layerwise / "config.json").write_text(json.dumps({**config, "architectures": ["LayerWiseMiniCPMForCausalLM"]}))
    with pytest.raises(ConfigError, match="layerwise / lightweight LLM reranker .* not supported. bge-ray has no scorer"):
        score(input_file=[FE_EXAMPLES], output_dir=str(tmp_path / "b"), reranker_name_or_path=str(layerwise))
    with pytest.raises(ConfigError, match="layerwise / lightweight LLM reranker .* transformers 5"):
        check_model(load_config(None, {"model_name_or_path": str(layerwise), "train_data": [FE_EXAMPLES],
                                       "output_dir": str(tmp_path / "c")}, RerankerConfig))
    with pytest.raises(ConfigError, match="--cutoff_layers '28' is not supported: .* transformers 5"):
        load_config(None, ["--input_file", FE_EXAMPLES, "--output_dir", str(tmp_path / "d"), "--reranker_name_or_path",
                           tiny_llm_reranker, "--cutoff_layers", "28"], cls=ScoreConfig)


def test_layerwise_and_lightweight_model_code_imports_what_this_transformers_lacks():
    """The reason layerwise and lightweight rerankers are refused: when this fails, support them."""
    import importlib.util

    import transformers

    assert not os.path.exists(os.path.join(os.path.dirname(transformers.__file__), "modeling_attn_mask_utils.py"))
    root = importlib.util.find_spec("FlagEmbedding").submodule_search_locations[0]
    for code in ("finetune/reranker/decoder_only/layerwise/modeling_minicpm_reranker.py",
                 "inference/reranker/decoder_only/models/modeling_minicpm_reranker.py",
                 "inference/reranker/decoder_only/models/gemma_model.py"):
        with open(os.path.join(root, code), encoding="utf-8") as f:
            assert "from transformers.modeling_attn_mask_utils import" in f.read(), code


# ---- decoder-only (LLM) rerankers: training ---------------------------------------------------------

@pytest.mark.parametrize(("query_max_len", "passage_max_len", "sep"), [(32, 128, "\n"), (16, 40, "\n"), (24, 64, " | ")])
def test_llm_pairs_are_tokenized_as_flagembeddings_llm_reranker_data_set(tiny_llm_reranker, query_max_len,
                                                                         passage_max_len, sep):
    """BOS, the query, sep, the passage (cut to fit), sep and the row's prompt (else FlagEmbedding's
    question), token for token as its AbsLLMRerankerTrainDataset builds each group."""
    import random

    import pyarrow as pa

    import_flag_model()
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsLLMRerankerTrainDataset

    tok = load_tokenizer(tiny_llm_reranker)
    rows = [{"query": r["query"], "pos": r["pos"][:1], "neg": r["neg"][:3],
             **({"prompt": "Does B answer A?"} if i % 2 else {})} for i, r in enumerate(_rows()[:12])]
    fe = AbsLLMRerankerTrainDataset.__new__(AbsLLMRerankerTrainDataset)
    fe.args = types.SimpleNamespace(query_max_len=query_max_len, passage_max_len=passage_max_len, train_group_size=4,
                                    query_instruction_for_rerank=None, passage_instruction_for_rerank=None,
                                    knowledge_distillation=False, shuffle_ratio=0.0, sep_token=sep)
    fe.tokenizer, fe.dataset, fe.max_length = tok, rows, query_max_len + passage_max_len
    fe.sep_inputs = tok(sep, add_special_tokens=False)["input_ids"]
    spec = TextSpec(tokenizer=tiny_llm_reranker, query_max_len=query_max_len, passage_max_len=passage_max_len,
                    pairs=True, llm_sep=sep)
    batch = pa.table({"query": [r["query"] for r in rows], "pos": [r["pos"] for r in rows],
                      "neg": [r["neg"] for r in rows], "prompt": [r.get("prompt") for r in rows]})
    ours = tokenize_pairs(batch, spec).to_pydict()
    cut = 0
    for i in range(len(rows)):
        random.seed(i)
        want = [p["input_ids"] for p in fe[i][0]]
        assert want[0] == ours["pos_ids"][i][0], i
        assert sorted(want[1:]) == sorted(ours["neg_ids"][i]), i  # its negatives come in a random order
        cut += sum(len(w) == query_max_len + passage_max_len for w in want)
        assert all(w[0] == tok.bos_token_id for w in want)
    assert cut > 0  # some pairs were cut to the budget


def test_an_llm_reranker_scores_as_flagembeddings_cross_decoder_model(tiny_llm_reranker):
    """The "Yes" logit of each left-padded pair's last token, as FlagEmbedding's CrossDecoderModel encodes."""
    import_flag_model()
    from FlagEmbedding.finetune.reranker.decoder_only.base.modeling import CrossDecoderModel

    from bge_ray.model.reranker import LLMReranker, yes_token

    tok = load_tokenizer(tiny_llm_reranker)
    ours = LLMReranker.from_pretrained(tiny_llm_reranker, yes_token(tok)).eval()
    fe = CrossDecoderModel(ours.model, tokenizer=tok).eval()
    ids = [tok("A: vitamin d\nB: bone loss in the elderly\nRelevant?", add_special_tokens=False)["input_ids"],
           tok("A: cells\nB: x\nRelevant?", add_special_tokens=False)["input_ids"]]
    padded, mask = pad_ids(ids, tok.pad_token_id, "left")
    features = {"input_ids": torch.from_numpy(padded), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        np.testing.assert_allclose(ours(**features).numpy(), fe.encode(features).numpy(), atol=1e-6)
        alone = [float(ours(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))) for x in ids]
    np.testing.assert_allclose(ours(**features).detach().numpy(), alone, atol=1e-6)


def test_a_rerankers_kind_and_lora_are_decided_before_ray(tiny_model, tiny_llm_reranker, tmp_path, capsys):
    from bge_ray.train.launch import check_model

    base = {"train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "out")}
    llm = check_model(load_config(None, {**base, "model_name_or_path": tiny_llm_reranker}, RerankerConfig))
    assert (llm.model_type, llm.use_lora) == ("decoder", True)  # FlagEmbedding's decoder runner: LoRA by default
    assert TextSpec.from_config(llm).llm_sep == "\n"
    full = check_model(load_config(None, {**base, "model_name_or_path": tiny_llm_reranker, "use_lora": False},
                                   RerankerConfig))
    assert (full.model_type, full.use_lora) == ("decoder", False)
    ce = check_model(load_config(None, {**base, "model_name_or_path": tiny_model, "sep_token": " "}, RerankerConfig))
    assert (ce.model_type, ce.use_lora, TextSpec.from_config(ce).llm_sep) == ("encoder", False, None)
    assert "sep_token does nothing" in capsys.readouterr().err
    for extra, match in (({"model_name_or_path": tiny_model, "model_type": "decoder"}, "is an encoder model"),
                         ({"model_name_or_path": tiny_llm_reranker, "model_type": "encoder"}, "is a decoder-only model"),
                         ({"model_name_or_path": tiny_model, "use_lora": True}, "its new classification head"),
                         ({"model_name_or_path": tiny_model, "lora_rank": 8}, "lora_rank: LoRA settings")):
        with pytest.raises(ConfigError, match=match):
            check_model(load_config(None, {**base, **extra}, RerankerConfig))


def test_llm_reranker_finetune_with_lora_exports_what_flagllmreranker_scores_alike(ray_cluster, tiny_model,
                                                                                  tiny_llm_reranker, tmp_path):
    """Two workers, ZeRO-2, LoRA (FlagEmbedding's decoder reranker default), rows with their own prompt,
    validation reranking a retriever's top 4: the adapters train, and merged_model/ scores pairs in
    FlagLLMReranker as the trained model scores them in bge-ray."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import bge_ray
    from bge_ray.model.reranker import LLMReranker, yes_token
    from tests.helpers import make_beir_subset

    rows = _rows()[:24]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**r, **({"prompt": "Does B answer A?"} if i % 3 == 0 else {})}) + "\n"
                            for i, r in enumerate(rows)))
    beir = make_beir_subset(str(tmp_path / "beir"), n_queries=4, n_extra_docs=10)
    retriever = shutil.copytree(tiny_model, tmp_path / "retriever")
    (retriever / "bge_ray.json").write_text(json.dumps({"sentence_pooling_method": "mean", "normalize_embeddings": True}))
    cfg = load_config(None, {
        "model_name_or_path": tiny_llm_reranker, "train_data": [str(data)], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero2",
        "per_device_train_batch_size": 2, "train_group_size": 3, "query_max_len": 16, "passage_max_len": 48,
        "gradient_checkpointing": True, "learning_rate": 5e-3, "max_steps": 3, "logging_steps": 1, "seed": 5,
        "lora_rank": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "save_merged_lora_model": True,
        "eval_data": beir, "eval_retriever": str(retriever), "eval_rerank_top_k": 4, "eval_steps": 3,
        "final_model": "last"}, RerankerConfig)
    result = bge_ray.finetune(cfg)
    assert result.metrics["step"] == 3 and (result.config.model_type, result.config.use_lora) == ("decoder", True)
    assert [e["step"] for e in result.evals] == [0, 3] and math.isfinite(result.evals[-1]["eval_ndcg@10"])
    out = result.model_dir
    with open(os.path.join(out, "bge_ray.json")) as f:
        meta = json.load(f)
    assert (meta["task"], meta["model_type"], meta["sep_token"]) == ("reranker", "decoder", "\n")
    tok = load_tokenizer(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_reranker)
    trained = LLMReranker(PeftModel.from_pretrained(base, out), yes_token(tok)).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged_model")).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_llm_reranker).state_dict()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], start["model.layers.0.self_attn.k_proj.weight"])
    pairs = [[r["query"], r["pos"][0]] for r in rows[:3]] + [[rows[0]["query"], rows[0]["neg"][0]]]
    # the pairs as FlagLLMReranker cuts them at max_length 512 (query 384 tokens, passage 512, its question)
    ids = llm_pair_inputs(tok, [q for q, _ in pairs], [p for _, p in pairs], [LLM_PROMPT] * len(pairs), 384, 512, 512)
    with torch.no_grad():
        ours = [float(trained(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))) for x in ids]
    import_flag_model()
    from FlagEmbedding import FlagLLMReranker

    fe = FlagLLMReranker(os.path.join(out, "merged_model"), use_fp16=False, devices="cpu",
                         query_instruction_for_rerank=None, passage_instruction_for_rerank=None, max_length=512)
    np.testing.assert_allclose(fe.compute_score(pairs), ours, atol=1e-5)
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "FlagLLMReranker(model_dir, query_instruction_for_rerank=None" in card and "merged_model" in card
