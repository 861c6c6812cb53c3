"""LLM-based (decoder-only) embedders with LoRA, as FlagEmbedding's decoder runner trains them: the
tokenizer (EOS appended, left padding, added tokens), LoRA's defaults and targets, what is refused, and
a fine-tune through Ray Train + DeepSpeed whose merged export embeds as bge-ray's own model does."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch

from bge_ray.config import load_config
from bge_ray.config.finetune import FinetuneConfig, RerankerConfig
from bge_ray.errors import ConfigError
from bge_ray.model.embedder import Embedder
from bge_ray.model.lora import add_lora, grow_embeddings, lora_config, lora_config_of
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.train.launch import check_model
from tests.flagembedding_compat import import_flag_model
from tests.helpers import FE_EXAMPLES, build_tiny_decoder
from tests.test_migration import decoder_base_args

TOKENS = ("<instruct>", "<query>")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("tiny_decoder")))


def flagembedding_decoder(model: str, out: str, **lora: object) -> tuple[object, torch.nn.Module]:
    """The tokenizer and model FlagEmbedding 1.4.2's decoder runner loads for ``model``."""
    import_flag_model()
    from FlagEmbedding.abc.finetune.embedder import AbsEmbedderTrainingArguments
    from FlagEmbedding.finetune.embedder.decoder_only.base import DecoderOnlyEmbedderModelArguments
    from FlagEmbedding.finetune.embedder.decoder_only.base.runner import DecoderOnlyEmbedderRunner

    runner = types.SimpleNamespace(
        model_args=DecoderOnlyEmbedderModelArguments(model_name_or_path=model, additional_special_tokens=list(TOKENS),
                                                     **lora),
        training_args=AbsEmbedderTrainingArguments(output_dir=out, sentence_pooling_method="last_token"))
    return DecoderOnlyEmbedderRunner.load_tokenizer_and_model(runner)


def test_a_decoder_is_tokenized_and_adapted_as_flagembeddings_decoder_runner_does(tiny_decoder, tmp_path):
    """EOS appended (and kept by truncation), left padding, the unknown token as padding, added tokens;
    LoRA on the same modules with the same trainable parameters at FlagEmbedding's defaults."""
    fe_tok, fe_model = flagembedding_decoder(tiny_decoder, str(tmp_path / "fe"))
    tok = load_tokenizer(tiny_decoder, special_tokens=TOKENS)
    texts = ["<instruct>Given a claim, find evidence\n<query>vitamin d deficiency causes bone loss", "cells", ""]
    for max_len in (4, 16, 64):
        ours = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        assert ours == fe_tok(texts, truncation=True, max_length=max_len)["input_ids"]
        assert all(ids[-1] == tok.eos_token_id for ids in ours)  # last_token pools EOS, as in FlagEmbedding
    assert (tok.padding_side, tok.pad_token, len(tok)) == (fe_tok.padding_side, fe_tok.pad_token, len(fe_tok))
    assert (tok.padding_side, tok.pad_token) == ("left", "<unk>")

    model = Embedder.from_pretrained(tiny_decoder, pooling="last_token")
    assert grow_embeddings(model.model, len(tok), seed=0)
    cfg = FinetuneConfig()  # LoRA's defaults are FlagEmbedding's: rank 64, alpha 16, dropout 0.1, 7 projections
    peft = add_lora(model.model, lora_config_of(cfg), seed=0)

    def trainable(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {n.split("base_model.model.")[-1]: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}

    assert trainable(peft) == trainable(fe_model.model) and len(trainable(peft)) == 2 * 2 * 7
    fe_lora = fe_model.model.peft_config["default"]
    ours = peft.peft_config["default"]
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "modules_to_save"):
        assert getattr(ours, name) == getattr(fe_lora, name), name


def test_new_rows_and_adapters_are_drawn_from_the_seed_alike_on_every_worker(tiny_decoder):
    """ZeRO-3 keeps each worker's own shard of what it built, so every worker must build the same model;
    the global random state is left as it was."""
    def build(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # each worker's own stream (init_seed(seed, rank))
        model = Embedder.from_pretrained(tiny_decoder, pooling="last_token")
        grow_embeddings(model.model, len(load_tokenizer(tiny_decoder, special_tokens=TOKENS)), seed=7)
        peft = add_lora(model.model, lora_config(8, 16, 0.1, ["q_proj", "v_proj"], None), seed=7)
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the worker's own stream did not move
        return {k: v.clone() for k, v in peft.state_dict().items()}

    a, b = build(1), build(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["base_model.model.embed_tokens.weight"][-1], a["base_model.model.embed_tokens.weight"][-2])


def test_lora_and_its_model_are_decided_and_checked_before_ray(tiny_decoder, tiny_model, tmp_path, capsys):
    base = {"train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "out"), "sentence_pooling_method": "last_token"}
    # unset: on for a decoder (FlagEmbedding's decoder runner), off for an encoder (its encoder runner)
    assert check_model(load_config(None, {**base, "model_name_or_path": tiny_decoder})).use_lora is True
    assert check_model(load_config(None, {**base, "model_name_or_path": tiny_model})).use_lora is False
    assert check_model(load_config(None, {**base, "model_name_or_path": tiny_decoder, "use_lora": False})).use_lora is False
    from transformers import GPT2Config, T5Config

    from bge_ray.model.tokenizer import is_decoder_only

    assert is_decoder_only(GPT2Config()) and not is_decoder_only(T5Config())  # T5 (GTR, sentence-t5) is no LLM
    # embed_tokens is adapted only once tokens are added (FlagEmbedding's rule), and the line says so
    cfg = check_model(load_config(None, {**base, "model_name_or_path": tiny_decoder,
                                         "target_modules": ["q_proj", "embed_tokens", "fc1"]}))
    assert cfg.target_modules == ["q_proj"]
    err = capsys.readouterr().err
    assert "not embed_tokens fc1" in err and "has no fc1" in err and "additional_special_tokens" in err
    assert "is a decoder-only model: it trains as FlagEmbedding's decoder runner trains it (LoRA rank 64, alpha 16" in err
    tokens = {**base, "model_name_or_path": tiny_decoder, "additional_special_tokens": list(TOKENS)}
    assert check_model(load_config(None, {**tokens, "target_modules": ["q_proj", "embed_tokens"]})).target_modules == [
        "q_proj", "embed_tokens"]
    refused = [
        ({"model_name_or_path": tiny_decoder, "target_modules": ["query", "value"]}, "has no module of these names"),
        ({"model_name_or_path": tiny_decoder, "modules_to_save": ["lm_head"]}, "modules_to_save.*no module"),
        ({"model_name_or_path": tiny_model, "lora_rank": 8}, "lora_rank: LoRA settings, but .* is an encoder"),
    ]
    for extra, match in refused:
        with pytest.raises(ConfigError, match=match):
            check_model(load_config(None, {**base, **extra}))
    # an encoder takes LoRA when asked, on its own module names
    bert = check_model(load_config(None, {**base, "model_name_or_path": tiny_model, "use_lora": True,
                                          "target_modules": ["query", "value"]}))
    assert (bert.use_lora, bert.target_modules) == (True, ["query", "value"])


@pytest.mark.parametrize(("extra", "match"), [
    ({"use_lora": False, "lora_rank": 8}, "lora_rank: LoRA settings with use_lora: false"),
    ({"use_lora": False, "save_merged_lora_model": True}, "save_merged_lora_model: LoRA settings with use_lora: false"),
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"additional_special_tokens": ["<a>", " "]}, "additional_special_tokens holds an empty token"),
    ({"use_flash_attn": True}, "flash-attention 2 is not bundled"),
    ({"from_peft": "adapters/"}, "starting from another run's LoRA adapters"),
    ({"icl_suffix_str": "\n<response>"}, "icl_suffix_str: in-context example settings without icl"),
])
def test_lora_settings_that_cannot_work_are_refused_with_the_reason(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"model_name_or_path": "m", "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path), **extra})


def test_a_reranker_refuses_added_tokens_and_an_unknown_model_type(tmp_path):
    base = {"model_name_or_path": "m", "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="additional_special_tokens: embedder settings in a reranker run"):
        load_config(None, {**base, "additional_special_tokens": ["<a>"]}, RerankerConfig)
    with pytest.raises(ConfigError, match="model_type must be encoder or decoder"):
        load_config(None, {**base, "model_type": "llm"}, RerankerConfig)
    with pytest.raises(ConfigError, match="model_type, sep_token: reranker settings in an embedder run"):
        load_config(None, {**base, "model_type": "decoder", "sep_token": " "})


def test_flagembeddings_decoder_script_moves_over_unchanged(tiny_decoder, tmp_path):
    """examples/finetune/embedder/decoder_only/base.sh, LoRA block included, parses with no notice and
    keeps every LoRA setting."""
    cfg = check_model(load_config(None, decoder_base_args(tiny_decoder, str(tmp_path / "out"), str(tmp_path / "c"))))
    assert (cfg.use_lora, cfg.lora_rank, cfg.lora_alpha, cfg.save_merged_lora_model) == (True, 32, 64.0, True)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert cfg.additional_special_tokens == list(TOKENS)
    assert cfg.query_instruction_format == "<instruct>{}\n<query>{}"


# ---- a fine-tune through Ray Train + DeepSpeed -------------------------------------------------------

def test_lora_finetune_exports_adapters_and_a_merged_model_that_embeds_as_bge_ray_does(ray_cluster, tiny_decoder,
                                                                                     tmp_path):
    """Two workers, ZeRO-3, LoRA with added tokens, an instruction format using them, gradient
    checkpointing and validation: only the adapters (and the new token rows they cannot reach stay as
    drawn) train; the export holds the adapters, and merged_model/ embeds in sentence-transformers as the
    trained model does in bge-ray and scores validation as the run's last validation did."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    import bge_ray
    from bge_ray.retrieval.encode import encode_texts
    from bge_ray.retrieval.metrics import evaluate_run
    from tests.helpers import make_beir_subset
    from tests.test_evaluation import in_process_search

    beir = make_beir_subset(str(tmp_path / "beir"), n_queries=6, n_extra_docs=20)
    fmt, instruction = "<instruct>{}\n<query>{}", "Given a claim, find evidence"
    cfg = load_config(None, {
        "model_name_or_path": tiny_decoder, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero3",
        "per_device_train_batch_size": 2, "train_group_size": 3, "query_max_len": 64, "passage_max_len": 256,
        "sentence_pooling_method": "last_token", "temperature": 0.05, "gradient_checkpointing": True,
        "learning_rate": 5e-3, "max_steps": 3, "logging_steps": 1, "seed": 3, "lora_rank": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "down_proj"], "additional_special_tokens": list(TOKENS),
        "save_merged_lora_model": True, "query_instruction_for_retrieval": instruction,
        "query_instruction_format": fmt, "eval_data": beir, "eval_steps": 3, "final_model": "last"})
    result = bge_ray.finetune(cfg)
    assert result.metrics["step"] == 3 and result.config.use_lora is True
    out = result.model_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "merged_model", "bge_ray.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "adapter_config.json")) as f:
        adapter = json.load(f)
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (8, 16,
                                                                                       ["down_proj", "q_proj", "v_proj"])
    # bge-ray's trained model: the base, grown for the added tokens, with the exported adapters
    tok = load_tokenizer(out)
    assert len(tok) == len(load_tokenizer(tiny_decoder)) + 2 and tok.padding_side == "left"
    base = AutoModel.from_pretrained(tiny_decoder)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    trained = Embedder(PeftModel.from_pretrained(base, out), pooling="last_token").eval()
    start = AutoModel.from_pretrained(tiny_decoder).state_dict()
    merged = AutoModel.from_pretrained(os.path.join(out, "merged_model")).state_dict()
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], start["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["layers.0.self_attn.k_proj.weight"], start["layers.0.self_attn.k_proj.weight"])
    texts = [fmt.format(instruction, "vitamin d deficiency"), "Bone loss in the elderly is common.", "cells"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, -1] == tok.eos_token_id).all() and enc["attention_mask"][-1, 0] == 0  # left padded
    with torch.no_grad():
        ours = trained.encode(enc["input_ids"], enc["attention_mask"]).numpy()
    st = SentenceTransformer(os.path.join(out, "merged_model"), device="cpu")
    np.testing.assert_allclose(st.encode(texts), ours, atol=1e-5)
    np.testing.assert_allclose(st.encode(["vitamin d deficiency"], prompt_name="query"), ours[:1], atol=1e-5)
    import_flag_model()
    from FlagEmbedding import FlagLLMModel

    fe = FlagLLMModel(os.path.join(out, "merged_model"), query_instruction_for_retrieval=instruction,
                      query_instruction_format=fmt, normalize_embeddings=True, use_fp16=False, devices="cpu")
    np.testing.assert_allclose(fe.encode_queries(["vitamin d deficiency"]), ours[:1], atol=1e-5)
    np.testing.assert_allclose(fe.encode_corpus(texts[1:]), ours[1:], atol=1e-5)
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert f'model_dir = "{out}/merged_model"' in card and "FlagLLMModel(model_dir" in card
    assert "LoRA adapters (rank 8, alpha 16" in card and "resize_token_embeddings" in card
    # the run's last validation scored the model the merged export is (queries with their instruction)
    found = in_process_search(beir, os.path.join(out, "merged_model"), pooling="last_token")
    ds, qids = found["dataset"], found["qids"]
    model = Embedder.from_pretrained(os.path.join(out, "merged_model"), pooling="last_token").eval()
    q_emb = encode_texts(model, tok, [fmt.format(instruction, ds.queries[q]) for q in qids], 64, 16,
                         torch.device("cpu"))
    scores = q_emb @ found["d_emb"].T
    run = {q: {d["_id"]: float(scores[i, j]) for j, d in enumerate(found["docs"])} for i, q in enumerate(qids)}
    assert result.evals[-1]["step"] == 3
    assert result.evals[-1]["eval_ndcg@10"] == pytest.approx(evaluate_run(ds.qrels, run, (10,))["ndcg@10"], abs=1e-5)
