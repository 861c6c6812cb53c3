"""bge_ray/model/embedder.py: pooling is right under left and right padding; normalisation."""

from __future__ import annotations

import pytest
import torch

from bge_ray.model.embedder import Embedder, pool


def _padded(hidden_rows, side):
    longest = max(h.size(0) for h in hidden_rows)
    d = hidden_rows[0].size(1)
    out = torch.full((len(hidden_rows), longest, d), 99.0)  # garbage in padding positions
    mask = torch.zeros(len(hidden_rows), longest, dtype=torch.long)
    for i, h in enumerate(hidden_rows):
        n = h.size(0)
        if side == "right":
            out[i, :n], mask[i, :n] = h, 1
        else:
            out[i, longest - n:], mask[i, longest - n:] = h, 1
    return out, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_ignores_padding(side):
    torch.manual_seed(0)
    rows = [torch.randn(n, 4) for n in (3, 6, 1)]
    hidden, mask = _padded(rows, side)
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.stack([r[0] for r in rows]))
    torch.testing.assert_close(pool(hidden, mask, "last_token"), torch.stack([r[-1] for r in rows]))
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([r.mean(0) for r in rows]))


def test_unknown_pooling():
    with pytest.raises(ValueError, match="use cls, mean, last_token"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")


@pytest.mark.parametrize("method", ["cls", "mean", "last_token"])
def test_embedder_batch_equals_one_by_one(tiny_model, method):
    # BERT's absolute positions make left padding change the model itself, so right padding here;
    # left padding is covered at the pooling level above.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = Embedder.from_pretrained(tiny_model, pooling=method, normalize=True).eval()
    texts = ["a short one", "a considerably longer sentence with many more tokens in it"]
    with torch.no_grad():
        alone = []
        for t in texts:
            enc = tok([t], return_tensors="pt")
            alone.append(model.encode(enc["input_ids"], enc["attention_mask"]))
        alone = torch.cat(alone)
        batch = tok(texts, padding=True, return_tensors="pt")
        emb = model.encode(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(emb, alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    unnormalized = Embedder(model.model, pooling=method, normalize=False)
    with torch.no_grad():
        raw = unnormalized.encode(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))


def test_fix_position_embedding_freezes_only_positions(tiny_model):
    model = Embedder.from_pretrained(tiny_model)
    assert model.freeze_position_embeddings() == 1
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embeddings.position_embeddings.weight"]


def test_attention_dropout_override(tiny_model):
    from bge_ray.model.embedder import Embedder

    assert Embedder.from_pretrained(tiny_model).model.config.attention_probs_dropout_prob == 0.1
    model = Embedder.from_pretrained(tiny_model, attention_dropout=0.0).model
    assert model.config.attention_probs_dropout_prob == 0.0
    assert model.config.hidden_dropout_prob == 0.1  # only the attention probabilities
    model.train()
    ids = torch.tensor([[101, 2054, 2003, 102]])
    mask = torch.ones_like(ids)
    # no attention dropout and hidden dropout still on: two train-mode passes still differ
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.equal(a, b)
