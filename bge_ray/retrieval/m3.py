"""Retrieval with BGE-M3's three outputs: embedding texts as FlagEmbedding's ``BGEM3FlagModel`` does, and
exact search by dense, sparse (lexical), ColBERT and hybrid scores over a stream of document chunks.

Per text, as ``BGEM3FlagModel.encode`` returns them: the dense embedding; the lexical weights (each token's
largest weight, tokens weighing 0 and the tokenizer's cls / eos / pad / unk left out) as ``sparse_ids`` and
``sparse_weights``; the ColBERT vectors of the tokens after the first (``colbert``, (tokens - 1, C)).

Scores, as FlagEmbedding's: dense ``q.d``; sparse: the sum over shared tokens of the product of their
weights; ColBERT: the mean over the query's vectors of the best match among the document's; hybrid
(FlagEmbedding's ``colbert+sparse+dense``): ``(w_d dense + w_s sparse + w_c colbert) / (w_d + w_s + w_c)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bge_ray.model.m3 import M3Embedder
from bge_ray.retrieval.search import TopK

MODES = ("dense", "sparse", "colbert", "hybrid")
COLBERT_BUDGET = 1 << 24  # query tokens x document tokens scored at once (x ColBERT size in memory)


@torch.inference_mode()
def encode_m3_texts(model: M3Embedder, tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
                    device: torch.device) -> dict[str, Any]:
    """``dense`` (N, D) float32, and per text ``sparse_ids`` / ``sparse_weights`` and ``colbert`` arrays, in
    input order (length-sorted batches inside)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    ids = enc["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out: dict[str, Any] = {"dense": None, "sparse_ids": [None] * len(texts), "sparse_weights": [None] * len(texts),
                           "colbert": [None] * len(texts)}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        dense, sparse, colbert = model.encode_all(padded["input_ids"].to(device), padded["attention_mask"].to(device))
        if out["dense"] is None:
            out["dense"] = np.zeros((len(texts), dense.shape[1]), dtype=np.float32)
        out["dense"][idx] = dense.float().cpu().numpy()
        sparse, colbert = sparse.float().cpu(), colbert.float().cpu().numpy()
        for row, i in enumerate(idx):
            tokens = torch.nonzero(sparse[row]).flatten()
            out["sparse_ids"][i] = tokens.numpy().astype(np.int64)
            out["sparse_weights"][i] = sparse[row, tokens].numpy().astype(np.float32)
            out["colbert"][i] = colbert[row, :len(ids[i]) - 1]
    if out["dense"] is None:
        out["dense"] = np.zeros((0, 0), dtype=np.float32)
    return out


def lexical_scores(q_ids: list[np.ndarray], q_weights: list[np.ndarray], d_ids: list[np.ndarray],
                   d_weights: list[np.ndarray]) -> torch.Tensor:
    """(Q, N) sparse scores, over the queries' own tokens only (a document token no query has adds nothing)."""
    vocab = np.unique(np.concatenate([*q_ids, np.zeros(0, dtype=np.int64)]))
    q = torch.zeros(len(q_ids), len(vocab))
    for row, (ids, w) in enumerate(zip(q_ids, q_weights, strict=True)):
        q[row, np.searchsorted(vocab, ids)] = torch.tensor(np.asarray(w, dtype=np.float32))  # a copy: Ray's are read-only
    d = torch.zeros(len(d_ids), len(vocab))
    for row, (ids, w) in enumerate(zip(d_ids, d_weights, strict=True)):
        ids, w = np.asarray(ids, dtype=np.int64), np.asarray(w, dtype=np.float32)
        pos = np.searchsorted(vocab, ids).clip(max=max(len(vocab) - 1, 0))
        hit = vocab[pos] == ids if len(vocab) else np.zeros(len(ids), dtype=bool)
        d[row, pos[hit]] = torch.as_tensor(w[hit])
    return q @ d.T


def _padded(vectors: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, C) zero-padded vectors and their (N, L) mask."""
    size = max([1, *(len(v) for v in vectors)])
    width = next((v.shape[1] for v in vectors if v.ndim == 2), 1)
    out, mask = torch.zeros(len(vectors), size, width), torch.zeros(len(vectors), size, dtype=torch.bool)
    for i, v in enumerate(vectors):
        out[i, :len(v)] = torch.tensor(np.asarray(v, dtype=np.float32)).reshape(len(v), width)  # a copy: read-only
        mask[i, :len(v)] = True
    return out, mask


def colbert_scores(queries: list[np.ndarray], docs: list[np.ndarray]) -> torch.Tensor:
    """(Q, N) ColBERT scores, documents taken in groups that keep the token-score tensor under
    :data:`COLBERT_BUDGET` elements."""
    q, q_mask = _padded(queries)
    q_len = q_mask.sum(dim=1).clamp(min=1)
    out = torch.zeros(len(queries), len(docs))
    step = max(1, COLBERT_BUDGET // max(1, q.shape[0] * q.shape[1] * max([1, *(len(d) for d in docs)])))
    for start in range(0, len(docs), step):
        d, d_mask = _padded(docs[start:start + step])
        token = torch.einsum("qic,njc->qinj", q, d).masked_fill(~d_mask[None, None], float("-inf"))
        best = token.max(dim=-1).values.clamp(min=torch.finfo(torch.float32).min)  # a document without tokens: -inf
        out[:, start:start + step] = (best * q_mask[:, :, None]).sum(dim=1) / q_len[:, None]
    return out


class M3Search:
    """The running top-k of each mode over a stream of document chunks (``add``), as :class:`TopK` keeps
    it for dense search: memory is the queries, one chunk and the (Q, k) results."""

    def __init__(self, queries: dict[str, Any], modes: tuple[str, ...], weights: tuple[float, float, float],
                 k: int) -> None:
        unknown = set(modes) - set(MODES)
        if unknown or not modes:
            raise ValueError(f"unknown retrieval modes {sorted(unknown)}; use {', '.join(MODES)}")
        self.queries, self.modes, self.weights = queries, modes, weights
        self.dense = torch.as_tensor(queries["dense"])
        self.tops = {mode: TopK(self.dense, k) for mode in modes}

    def add(self, docs: dict[str, Any], ids: list[str]) -> None:
        need = set(self.modes) | ({"dense", "sparse", "colbert"} if "hybrid" in self.modes else set())
        scores: dict[str, torch.Tensor] = {}
        if "dense" in need:
            scores["dense"] = self.dense @ torch.as_tensor(np.asarray(docs["dense"], dtype=np.float32)).T
        if "sparse" in need:
            scores["sparse"] = lexical_scores(self.queries["sparse_ids"], self.queries["sparse_weights"],
                                              list(docs["sparse_ids"]), list(docs["sparse_weights"]))
        if "colbert" in need:
            scores["colbert"] = colbert_scores(self.queries["colbert"], list(docs["colbert"]))
        if "hybrid" in need:
            w_dense, w_sparse, w_colbert = self.weights
            scores["hybrid"] = ((w_dense * scores["dense"] + w_sparse * scores["sparse"] + w_colbert * scores["colbert"])
                                / max(sum(self.weights), 1e-12))
        for mode in self.modes:
            self.tops[mode].add_scores(scores[mode], ids)

    def runs(self, query_ids: list[str]) -> dict[str, dict[str, dict[str, float]]]:
        """``{mode: {query id: {doc id: score}}}``."""
        return {mode: top.run(query_ids) for mode, top in self.tops.items()}
