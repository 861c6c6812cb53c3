"""bge_ray/train/export.py without a cluster: a model directory written from a tiny BERT's state dict
loads in sentence-transformers (pooling, normalisation, query prompt) and transformers with the
embeddings bge-ray computes, and says what it was trained with."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bge_ray.config import FinetuneConfig
from bge_ray.model.embedder import Embedder
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.train.export import METADATA_FILE, export_model, prompt_prefix

TEXTS = ["what causes tides", "The moon's gravity pulls the oceans.", "a"]


def _export(tiny_model, out, **values):
    cfg = FinetuneConfig(model_name_or_path=tiny_model, train_data=["x"], output_dir=str(out), **values).to_dict()
    model = Embedder.from_pretrained(tiny_model, pooling=cfg["sentence_pooling_method"]).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights that differ from the files on disk: the export must write these
    export_model(model, load_tokenizer(tiny_model), model.state_dict(), str(out), cfg)
    return model


@pytest.mark.parametrize("pooling, normalize", [("cls", True), ("mean", False), ("last_token", True)])
def test_exported_model_embeds_the_same_in_sentence_transformers_and_transformers(tiny_model, tmp_path, pooling,
                                                                                    normalize):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "model"
    trained = _export(tiny_model, out, sentence_pooling_method=pooling, normalize_embeddings=normalize)
    ours = Embedder(trained, pooling=pooling, normalize=normalize).eval()
    reloaded = Embedder.from_pretrained(str(out), pooling=pooling, normalize=normalize).eval()
    tok = load_tokenizer(str(out))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        want = ours.encode(enc["input_ids"], enc["attention_mask"]).numpy()
        np.testing.assert_allclose(reloaded.encode(enc["input_ids"], enc["attention_mask"]).numpy(), want, atol=1e-6)
    st = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(st, want, atol=1e-5)


def test_metadata_and_the_query_instruction_as_a_prompt(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "model"
    _export(tiny_model, out, sentence_pooling_method="mean", query_instruction_for_retrieval="query: ",
            passage_max_len=77)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["sentence_pooling_method"] == "mean" and meta["query_instruction_for_retrieval"] == "query: "
    assert meta["training_config"]["passage_max_len"] == 77
    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["query"] == "query: " and st.max_seq_length == 77
    np.testing.assert_allclose(st.encode(["tides"], prompt_name="query"), st.encode(["query: tides"]), atol=1e-6)
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "pytorch_model.bin")


def test_prompt_prefix():
    assert prompt_prefix("{}{}", "query: ") == "query: "
    assert prompt_prefix("<instruct>{}\n<query>{}", "find it") == "<instruct>find it\n<query>"
    assert prompt_prefix("{}{}", None) is None
    assert prompt_prefix("{}: {}", "x") == "x: "
    assert prompt_prefix("{1} {0}", "x") is None  # the text does not come last: no prefix can express it
