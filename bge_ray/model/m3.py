"""BGE-M3: one encoder, three representations of a text (FlagEmbedding's ``EncoderOnlyEmbedderM3Model``).

* **dense**: the pooled embedding, as :class:`~bge_ray.model.embedder.Embedder`'s;
* **sparse** (lexical): a weight per token, ``relu(sparse_linear(h_t))``, gathered into a vocabulary-sized
  vector by the max over repeated tokens; the tokenizer's cls, eos, pad and unk tokens weigh nothing;
* **ColBERT** (multi-vector): ``colbert_linear(h_t)`` for every token after the first, zero at padding,
  normalised with the dense embedding.

Scores (what :func:`bge_ray.model.loss.m3_loss` trains and :mod:`bge_ray.retrieval` ranks by): dense
``q.p``; sparse ``q_sparse.p_sparse`` (the sum over shared tokens of the product of their weights);
ColBERT ``sum_i max_j q_i.p_j / (query tokens - 1)``.

The heads live beside the transformer as ``colbert_linear.pt`` and ``sparse_linear.pt`` (torch state
dicts of ``nn.Linear``), where FlagEmbedding's ``BGEM3FlagModel`` reads them. A model that has both keeps
them; otherwise they start from ``nn.Linear``'s initialisation, drawn from ``seed`` so every worker starts
alike.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.utils import cached_file

from bge_ray.model.embedder import Embedder, pool

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
HEADS = ("colbert_linear", "sparse_linear")

M3Reps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dense (N, D), sparse (N, V), ColBERT (N, L-1, C)


def _head_file(name_or_path: str, filename: str, cache_dir: str | None) -> str | None:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    return cached_file(name_or_path, filename, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)


def has_heads(name_or_path: str, cache_dir: str | None = None) -> bool:
    """Whether the model has BGE-M3's ``colbert_linear.pt`` and ``sparse_linear.pt``."""
    return all(_head_file(name_or_path, f, cache_dir) is not None for f in (COLBERT_FILE, SPARSE_FILE))


def saved_heads(name_or_path: str, cache_dir: str | None = None) -> dict[str, dict[str, torch.Tensor]] | None:
    """The model's own ``colbert_linear`` and ``sparse_linear`` state dicts, or None unless it has both
    (FlagEmbedding's rule: one alone is not loaded)."""
    files = [_head_file(name_or_path, f, cache_dir) for f in (COLBERT_FILE, SPARSE_FILE)]
    if None in files:
        return None
    return {name: torch.load(f, map_location="cpu", weights_only=True) for name, f in zip(HEADS, files, strict=True)}


def colbert_size(name_or_path: str, colbert_dim: int = -1, cache_dir: str | None = None,
                 trust_remote_code: bool = False, heads: dict[str, dict[str, torch.Tensor]] | None = None) -> int:
    """The ColBERT head's output size for this model and ``colbert_dim`` (checked on the driver, before Ray);
    ``heads``: the model's :func:`saved_heads`, when the caller has already read them.

    Raises:
        ValueError: ``colbert_dim`` differs from the size of the model's own ColBERT head, or the model's
            config cannot be read.
    """
    heads = heads if heads is not None else saved_heads(name_or_path, cache_dir)
    if heads is not None:
        size = int(heads["colbert_linear"]["weight"].shape[0])
        if colbert_dim > 0 and colbert_dim != size:
            raise ValueError(f"colbert_dim {colbert_dim}: {name_or_path} has a ColBERT head of size {size} "
                             f"({COLBERT_FILE}); leave colbert_dim at -1 to keep it")
        return size
    try:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(f"{name_or_path}: its config cannot be read ({e})") from None
    return colbert_dim if colbert_dim > 0 else int(config.hidden_size)


def unused_token_ids(tokenizer: Any) -> list[int]:
    """The tokens whose sparse weight is zero: the tokenizer's cls, eos, pad and unk (those it has)."""
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "eos", "pad", "unk")}
    return sorted(i for i in ids if i is not None)


class M3Embedder(Embedder):
    """An :class:`Embedder` with BGE-M3's sparse and ColBERT heads. ``encode`` gives the dense embedding
    (what validation and search use); ``encode_all`` and ``forward`` give all three (:data:`M3Reps`)."""

    def __init__(self, model: nn.Module, colbert_linear: nn.Linear, sparse_linear: nn.Linear,
                 unused_tokens: list[int], pooling: str = "cls", normalize: bool = True) -> None:
        super().__init__(model, pooling=pooling, normalize=normalize)
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        keep = torch.ones(int(model.config.vocab_size))
        keep[unused_tokens] = 0.0
        self.register_buffer("sparse_keep", keep, persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, tokenizer: Any = None, colbert_dim: int = -1, seed: int = 0,
                        **kwargs: Any) -> M3Embedder:
        """The transformer as :meth:`Embedder.from_pretrained` loads it (``kwargs``), and the model's heads,
        or new ones of ``colbert_dim`` outputs (-1: the hidden size), initialised from ``seed``."""
        base = Embedder.from_pretrained(name_or_path, **kwargs)
        hidden = int(base.model.config.hidden_size)
        heads = saved_heads(name_or_path, kwargs.get("cache_dir"))  # read once: sized and loaded from it
        size = colbert_size(name_or_path, colbert_dim, kwargs.get("cache_dir"), kwargs.get("trust_remote_code", False),
                            heads=heads)
        dtype = next(base.model.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            colbert, sparse = nn.Linear(hidden, size, dtype=dtype), nn.Linear(hidden, 1, dtype=dtype)
        if heads is not None:
            colbert.load_state_dict(heads["colbert_linear"])
            sparse.load_state_dict(heads["sparse_linear"])
        return cls(base.model, colbert, sparse, unused_token_ids(tokenizer) if tokenizer is not None else [],
                   pooling=base.pooling, normalize=base.normalize)

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, L) sparse weight of every token position."""
        return torch.relu(self.sparse_linear(hidden)).squeeze(-1)

    def sparse_vectors(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, vocab) lexical vectors: each token's largest weight in the text; unused tokens 0."""
        weights = self.token_weights(hidden)
        empty = weights.new_zeros(input_ids.size(0), self.sparse_keep.numel())
        return empty.scatter_reduce(1, input_ids, weights, reduce="amax") * self.sparse_keep.to(weights.dtype)

    def colbert_vectors(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L-1, C) vectors of the tokens after the first, zero at padding (normalised by the caller)."""
        return self.colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:].unsqueeze(-1).to(hidden.dtype)

    def encode_all(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        dense = pool(hidden, attention_mask, self.pooling)
        sparse = self.sparse_vectors(hidden, input_ids)
        colbert = self.colbert_vectors(hidden, attention_mask)
        if self.normalize:
            dense, colbert = F.normalize(dense, dim=-1), F.normalize(colbert, dim=-1)
        return dense, sparse, colbert

    def forward(self, q_input_ids: torch.Tensor | None, q_attention_mask: torch.Tensor | None,
                p_input_ids: torch.Tensor | None = None, p_attention_mask: torch.Tensor | None = None,
                ) -> tuple[M3Reps | None, M3Reps | None]:
        q = self.encode_all(q_input_ids, q_attention_mask) if q_input_ids is not None else None
        p = self.encode_all(p_input_ids, p_attention_mask) if p_input_ids is not None else None
        return q, p

    def freeze_encoder(self) -> None:
        """FlagEmbedding's ``fix_encoder``: only the sparse and ColBERT heads train."""
        for param in self.model.parameters():
            param.requires_grad_(False)


def save_heads(state_dict: dict[str, torch.Tensor], out_dir: str) -> None:
    """``colbert_linear.pt`` and ``sparse_linear.pt`` from a state dict keyed ``colbert_linear.weight``..."""
    for name, filename in zip(HEADS, (COLBERT_FILE, SPARSE_FILE), strict=True):
        head = {k[len(name) + 1:]: v.detach().cpu().clone() for k, v in state_dict.items() if k.startswith(name + ".")}
        torch.save(head, os.path.join(out_dir, filename))
