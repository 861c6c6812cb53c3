"""Exact top-k search by inner product, in chunks: the (queries x corpus) score matrix is never built."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def truncate(emb: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka: the first ``dim`` values of each embedding (normalised again where the model
    normalises); ``None`` keeps them whole.

    Raises:
        ValueError: ``dim`` larger than the embeddings.
    """
    if dim is None or dim == emb.shape[-1]:
        return emb  # the whole embedding, as the model gives it
    if not 0 < dim < emb.shape[-1]:
        raise ValueError(f"cannot cut {emb.shape[-1]}-dimensional embeddings to {dim} dimensions")
    cut = emb[..., :dim]
    return F.normalize(cut, dim=-1) if normalize else cut


class TopK:
    """The running top-k of ``queries @ docs.T`` over a stream of document chunks: keeps (Q, k)
    scores and indices, never (Q, N).

    Without ids, ``index`` holds document positions in the order they were added. With ids
    (``add(docs, ids)``), :meth:`run` maps results to them, and only ids still in some top-k are
    kept, so memory stays O(Q x k) however large the corpus.
    """

    def __init__(self, queries: torch.Tensor, k: int) -> None:
        self.queries, self.k = queries, k
        rows = queries.shape[0]
        self.scores = torch.full((rows, 0), float("-inf"), device=queries.device)
        self.index = torch.zeros((rows, 0), dtype=torch.long, device=queries.device)
        self.ids: list[str] | None = None
        self.seen = 0

    def add(self, docs: torch.Tensor, ids: list[str] | None = None) -> None:
        """A chunk of document embeddings, scored by inner product with the queries."""
        self.add_scores(self.queries @ docs.T, ids)

    def add_scores(self, scores: torch.Tensor, ids: list[str] | None = None) -> None:
        """A chunk's (Q, n) scores, computed by the caller (another way to score: sparse, ColBERT, hybrid)."""
        if (ids is None) != (self.ids is None) and self.seen:
            raise ValueError("give ids with every chunk or with none")
        if ids is not None:
            self.ids = self.ids if self.ids is not None else []
            base = len(self.ids)
            self.ids.extend(ids)
        else:
            base = self.seen
        self.seen += scores.shape[1]
        index = torch.arange(base, base + scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
        merged, merged_index = torch.cat([self.scores, scores], dim=1), torch.cat([self.index, index], dim=1)
        top = torch.topk(merged, min(self.k, merged.shape[1]), dim=1)
        self.scores, self.index = top.values, torch.gather(merged_index, 1, top.indices)
        if self.ids is not None and len(self.ids) > 4 * self.k * max(1, self.queries.shape[0]):
            self._compact()

    def _compact(self) -> None:
        used = torch.unique(self.index)
        remap = torch.full((len(self.ids),), -1, dtype=torch.long, device=self.index.device)
        remap[used] = torch.arange(len(used), device=self.index.device)
        self.ids = [self.ids[i] for i in used.tolist()]
        self.index = remap[self.index]

    def run(self, query_ids: list[str]) -> dict[str, dict[str, float]]:
        """``{query id: {doc id: score}}`` (needs ids)."""
        if self.ids is None:
            raise ValueError("run() needs the document ids: add chunks with add(docs, ids)")
        return {qid: {self.ids[j]: float(s) for j, s in zip(self.index[i].tolist(), self.scores[i].tolist(), strict=True)}
                for i, qid in enumerate(query_ids)}


def search(queries: torch.Tensor, docs: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ docs.T`` over an in-memory matrix, ``chunk`` documents at a time:
    (scores, indices), best first."""
    top = TopK(queries, k)
    for start in range(0, docs.shape[0], chunk):
        top.add(docs[start:start + chunk])
    return top.scores, top.index
