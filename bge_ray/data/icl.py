"""In-context examples, as FlagEmbedding's ``decoder_only.icl`` runner builds them (bge-en-icl).

A query of a batch is trained as ``<examples><query><icl_suffix_str>``: 0-5 (drawn) of the batch's
other rows' (query, positive) pairs, each ``<query><icl_suffix_str><positive>\\n\\n``, for as long as
they stay under ``query_max_len - 512`` tokens; then the whole is cut to leave room for the tokenizer's
BOS and the suffix with EOS, and the suffix is put back after the cut. Symmetric passages (sts,
clustering) end with the suffix too; a clustering row's example answer is its ``category``.

The texts are FlagEmbedding's to the character: every cut is its tokenize-then-decode. The rows'
parts (instructions, example texts, passages) are made in the tokenize tasks
(:func:`tokenize_icl_rows`); the examples, which need the whole batch, on the worker
(:class:`IclCollator`), seeded by the batch's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from bge_ray.data.collate import GroupCollator
from bge_ray.data.text import TextSpec, carried_columns, regroup
from bge_ray.errors import DataValidationError
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.seeds import icl_rng

EXAMPLE_CHOICES = (0, 1, 2, 3, 4, 5)  # how many examples a query may get, drawn uniformly
ROOM_FOR_QUERY = 512  # examples stop before their tokens pass query_max_len - 512
SYMMETRIC = ("symmetric_sts", "symmetric_clustering")  # passages formatted as queries, suffix after
ALWAYS_EXAMPLES = (*SYMMETRIC, "symmetric_class")  # examples even without retrieval_use_examples


def cut_then_suffix(tok: Any, texts: list[str], max_tokens: int, suffix: str) -> list[str]:
    """Each text cut to ``max_tokens`` tokens (decoded back), then ``suffix``."""
    if not texts:
        return []
    ids = tok(texts, max_length=max_tokens, truncation=True, add_special_tokens=False)["input_ids"]
    return [tok.decode(i) + suffix for i in ids]


def head(tok: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Each text's first ``max_tokens`` tokens, decoded."""
    if not texts:
        return []
    return [tok.decode(i[:max_tokens]) for i in tok(texts, add_special_tokens=False)["input_ids"]]


def suffix_tokens(tok: Any, suffix: str) -> int:
    """Tokens of the suffix and EOS after a text (FlagEmbedding counts those of ``f"{suffix}{eos_token}"``)."""
    return len(tok(f"{suffix}{tok.eos_token}", add_special_tokens=False)["input_ids"])


def suffix_room(tok: Any, suffix: str) -> int:
    """Tokens a query leaves for the BOS before it and the suffix and EOS after it (FlagEmbedding counts
    those of the string ``f"{bos_token}"`` too)."""
    return len(tok(f"{tok.bos_token}", add_special_tokens=False)["input_ids"]) + suffix_tokens(tok, suffix)


def icl_query_texts(tok: Any, queries: list[str], max_len: int, suffix: str) -> list[str]:
    """Queries as an icl model reads them without examples (validation, evaluation): cut, then the suffix."""
    return cut_then_suffix(tok, queries, max_len - suffix_room(tok, suffix), suffix)


def model_queries(tok: Any, spec: TextSpec, queries: list[str]) -> list[str]:
    """Formatted queries as the model reads them at inference: an icl model's with its suffix (no
    examples), any other's unchanged."""
    return queries if spec.icl_suffix is None else icl_query_texts(tok, queries, spec.query_max_len, spec.icl_suffix)


def draw_examples(rng: Any, n_queries: int, n_pairs: int) -> list[list[int]]:
    """For each query of a batch, the pairs (indices) offered as its examples: a count drawn from 0-5,
    then that many + 1 pairs drawn, the query's own left out, the first ``count`` kept."""
    draws = []
    for i in range(n_queries):
        count = rng.choice(EXAMPLE_CHOICES)
        if count == 0 or n_pairs == 0:
            draws.append([])
            continue
        picked = rng.sample(range(n_pairs), min(count + 1, n_pairs))
        if i in picked:
            picked.remove(i)
        draws.append(picked[:count])
    return draws


def icl_queries(tok: Any, queries: list[str], pairs: list[tuple[str, str]], draws: list[list[int]],
                spec: TextSpec) -> list[str]:
    """The batch's queries with their examples and the suffix, as text."""
    suffix = spec.icl_suffix or ""
    texts = []
    for query, offered in zip(queries, draws, strict=True):
        prefix = ""
        for idx in offered:
            longer = prefix + suffix.join(pairs[idx]) + "\n\n"
            if len(tok(longer)["input_ids"]) > spec.query_max_len - ROOM_FOR_QUERY:
                break
            prefix = longer
        texts.append(prefix + query)
    return cut_then_suffix(tok, texts, spec.query_max_len - suffix_room(tok, suffix), suffix)


def row_parts(tok: Any, queries: list[str], positives: list[str], passages: list[list[str]],
              kinds: list[str | None], categories: list[str | None], spec: TextSpec) -> dict[str, list]:
    """What a tokenize task makes of rows for icl: the instructed query (text), its example pair (None when
    its type gets none) and its passages' token ids (symmetric ones cut, with the suffix)."""
    suffix = spec.icl_suffix or ""
    flat = [t for row in passages for t in row]
    symmetric = [k in SYMMETRIC for k, row in zip(kinds, passages, strict=True) for _ in row]
    sym_texts = cut_then_suffix(tok, [t for t, s in zip(flat, symmetric, strict=True) if s],
                                spec.passage_max_len - 1 - suffix_tokens(tok, suffix), suffix)
    it = iter(sym_texts)
    flat = [next(it) if s else t for t, s in zip(flat, symmetric, strict=True)]
    ids = tok(flat, truncation=True, max_length=spec.passage_max_len)["input_ids"] if flat else []
    nested = regroup(ids, [len(row) for row in passages])
    answers = [c if k == "symmetric_clustering" else p for k, c, p in zip(kinds, categories, positives, strict=True)]
    with_examples = [spec.retrieval_use_examples or k in ALWAYS_EXAMPLES for k in kinds]
    ex_q = head(tok, queries, spec.example_query_max_len)
    ex_p = head(tok, [a or "" for a in answers], spec.example_passage_max_len)
    return {"q_text": queries, "passage_ids": nested,
            "ex_q": [q if w else None for q, w in zip(ex_q, with_examples, strict=True)],
            "ex_p": [p if w else None for p, w in zip(ex_p, with_examples, strict=True)]}


def tokenize_icl_rows(batch: pa.Table, spec: TextSpec) -> pa.Table:
    """:func:`bge_ray.data.pipeline.tokenize_rows` for icl: the rows' queries stay text (with their
    instruction) and carry their example pair; the worker adds the examples (:class:`IclCollator`)."""
    tok = load_tokenizer(spec.tokenizer, spec.cache_dir, spec.trust_remote_code, spec.use_fast_tokenizer,
                         spec.special_tokens)
    prompts, kinds = batch.column("prompt").to_pylist(), batch.column("type").to_pylist()
    categories = batch.column("category").to_pylist()
    for kind, category, source in zip(kinds, categories, batch.column("source").to_pylist(), strict=True):
        if kind == "symmetric_clustering" and category is None:
            raise DataValidationError(f"{source}: a symmetric_clustering row needs its 'category' under icl (the "
                                      "answer of its in-context example)")
    pos_rows = batch.column("pos").to_pylist()
    groups = [[*p, *(n or [])] for p, n in zip(pos_rows, batch.column("neg").to_pylist(), strict=True)]
    formatted = [[spec.query(t, prompt) if kind in SYMMETRIC else spec.passage(t) for t in group]
                 for group, prompt, kind in zip(groups, prompts, kinds, strict=True)]
    queries = spec.format(batch.column("query").to_pylist(), "query", prompts)
    parts = row_parts(tok, queries, [p[0] for p in pos_rows], formatted, kinds, categories, spec)
    ids_type = pa.list_(pa.list_(pa.int32()))
    out = {"q_text": pa.array(parts["q_text"], type=pa.string()),
           "ex_q": pa.array(parts["ex_q"], type=pa.string()), "ex_p": pa.array(parts["ex_p"], type=pa.string()),
           "pos_ids": pa.array([g[:1] for g in parts["passage_ids"]], type=ids_type),
           "neg_ids": pa.array([g[1:] for g in parts["passage_ids"]], type=ids_type), **carried_columns(batch)}
    return pa.table(out)


@dataclass
class IclCollator:
    """A worker's icl batch as model inputs: each query with its drawn examples (seeded by ``seed`` and
    the batch's rows), tokenized, then ``inner``'s padded queries and groups."""

    inner: GroupCollator
    tokenizer: Any
    spec: TextSpec
    seed: int

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = self.query_texts(batch, icl_rng(self.seed, [int(k) for k in batch["row_key"]]))
        q_ids = self.tokenizer(texts, truncation=True, max_length=self.spec.query_max_len)["input_ids"]
        return self.inner({**batch, "q_ids": q_ids})

    def query_texts(self, batch: dict[str, Any], rng: Any) -> list[str]:
        """The batch's queries with examples drawn from ``rng`` (``choice`` and ``sample``, as random's)."""
        queries = [str(q) for q in batch["q_text"]]
        keyed = batch["ex_q"][0] is not None  # a batch is one data set: all its rows have examples, or none
        pairs = list(zip(batch["ex_q"], batch["ex_p"], strict=True)) if keyed else []
        return icl_queries(self.tokenizer, queries, pairs, draw_examples(rng, len(queries), len(pairs)), self.spec)
