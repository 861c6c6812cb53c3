"""A reranker's input: each query with each passage of its group as one sequence, FlagEmbedding's way
(a decoder-only LLM reranker's: :func:`llm_pair_inputs`).

The query keeps at most ``query_max_len + passage_max_len // 4`` tokens, the passage at most
``passage_max_len + query_max_len // 2``; then the pair, with the tokenizer's special tokens
(``[CLS] query [SEP] passage [SEP]`` for BERT), is cut to ``query_max_len + passage_max_len`` tokens
by shortening the passage (FlagEmbedding's ``truncation="only_second"``). Cuts fall at token
boundaries: a text is cut where its last kept token ends, then the pair is tokenized.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from bge_ray.data.text import TextSpec, carried_columns, regroup
from bge_ray.model.tokenizer import load_tokenizer

# FlagEmbedding's question after an LLM reranker's pair (its data set's and FlagLLMReranker's default)
LLM_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
              "providing a prediction of either 'Yes' or 'No'.")


def cut_to_tokens(tok: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Each text up to the end of its ``max_tokens``-th token (special tokens not counted)."""
    if not texts:
        return []
    if not tok.is_fast:  # no offsets: the kept tokens decoded (FlagEmbedding's way under transformers 5)
        ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        return [tok.decode(i, skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    return [text[:offsets[-1][1]] if offsets else "" for text, offsets in zip(texts, enc["offset_mapping"], strict=True)]


def pair_inputs(tok: Any, queries: list[str], passages: list[str], query_tokens: int, passage_tokens: int,
                max_length: int) -> dict[str, list[list[int]]]:
    """``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) of each (query, passage): the
    query cut to ``query_tokens``, the passage to ``passage_tokens``, the pair to ``max_length`` by
    shortening the passage."""
    q = cut_to_tokens(tok, queries, query_tokens)
    p = cut_to_tokens(tok, passages, passage_tokens)
    enc = tok(q, p, truncation="only_second", max_length=max_length, add_special_tokens=True,
              return_attention_mask=False)
    return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}


def llm_pair_inputs(tok: Any, queries: list[str], passages: list[str], prompts: list[str], query_tokens: int,
                    passage_tokens: int, pair_tokens: int, sep: str = "\n", tail_inside: bool = False
                    ) -> list[list[int]]:
    """``input_ids`` of each (query, passage) for a decoder-only (LLM) reranker, as FlagEmbedding builds
    them: BOS (where it is not the pad token) and the query cut to ``query_tokens``, then ``sep`` and the
    passage cut to ``passage_tokens``, shortened (on the tokenizer's truncation side) so the two fit
    ``pair_tokens``, then ``sep`` and the prompt; the relevance is the next token's "Yes" logit.

    ``tail_inside``: the whole sequence fits ``pair_tokens`` (its training data set, ``pair_tokens`` =
    query_max_len + passage_max_len); else the tail comes on top (``FlagLLMReranker``, ``pair_tokens`` =
    max_length).
    """
    sep_ids = tok(sep, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.pad_token_id else []
    q_ids = tok(queries, add_special_tokens=False, truncation=True, max_length=query_tokens)["input_ids"]
    p_ids = tok(passages, add_special_tokens=False, truncation=True, max_length=passage_tokens)["input_ids"]
    prompt_ids = {p: tok(p, add_special_tokens=False)["input_ids"] for p in set(prompts)}
    out = []
    for q, p, prompt in zip(q_ids, p_ids, prompts, strict=True):
        tail = sep_ids + prompt_ids[prompt]
        first, second = bos + q, sep_ids + p
        remove = len(first) + len(second) - (pair_tokens - len(tail) if tail_inside else pair_tokens + len(tail))
        if 0 < remove < len(second):  # transformers' only_second rule: a passage it cannot shorten enough stays whole
            second = second[remove:] if tok.truncation_side == "left" else second[:-remove]
        out.append(first + second + tail)
    return out


def training_pairs(tok: Any, queries: list[str], passages: list[str], query_max_len: int,
                   passage_max_len: int) -> dict[str, list[list[int]]]:
    """:func:`pair_inputs` with FlagEmbedding's training budget (the module docstring)."""
    return pair_inputs(tok, queries, passages, query_max_len + passage_max_len // 4,
                       passage_max_len + query_max_len // 2, query_max_len + passage_max_len)


def training_pair_ids(tok: Any, queries: list[str], passages: list[str], prompts: list[str | None],
                      spec: TextSpec) -> dict[str, list[list[int]]]:
    """The pairs of a reranker being trained, cut as FlagEmbedding's data set for its kind cuts them: a
    cross-encoder's (:func:`training_pairs`) or an LLM reranker's (a row's ``prompt``, else
    FlagEmbedding's question, after each pair)."""
    q, p = spec.query_max_len, spec.passage_max_len
    if spec.llm_sep is None:
        return training_pairs(tok, queries, passages, q, p)
    return {"input_ids": llm_pair_inputs(tok, queries, passages, [x if x is not None else LLM_PROMPT for x in prompts],
                                         q + p // 4, p + q // 2, q + p, spec.llm_sep, tail_inside=True)}


def tokenize_pairs(batch: pa.Table, spec: TextSpec) -> pa.Table:
    """Every row's group as pairs: ``pos_ids`` / ``neg_ids`` hold the (query, passage) sequences, in the
    layout :func:`bge_ray.data.pipeline.tokenize_rows` gives single texts (``pos_types`` / ``neg_types``:
    their token types). A row's ``query_prompt`` / ``passage_prompt`` overrides the instructions."""
    tok = load_tokenizer(spec.tokenizer, spec.cache_dir, spec.trust_remote_code, spec.use_fast_tokenizer,
                         spec.special_tokens)
    n = batch.num_rows
    q_prompts = batch.column("query_prompt").to_pylist() if "query_prompt" in batch.column_names else [None] * n
    p_prompts = batch.column("passage_prompt").to_pylist() if "passage_prompt" in batch.column_names else [None] * n
    llm_prompts = batch.column("prompt").to_pylist() if "prompt" in batch.column_names else [None] * n
    queries = spec.format(batch.column("query").to_pylist(), "query", q_prompts)
    sizes, pair_q, pair_p, pair_prompt = [], [], [], []
    for column in ("pos", "neg"):
        for i, (texts, prompt) in enumerate(zip(batch.column(column).to_pylist(), p_prompts, strict=True)):
            texts = texts or []
            sizes.append(len(texts))
            pair_q += [queries[i]] * len(texts)
            pair_p += [spec.passage(t, prompt) for t in texts]
            pair_prompt += [llm_prompts[i]] * len(texts)
    enc = training_pair_ids(tok, pair_q, pair_p, pair_prompt, spec) if pair_q else {"input_ids": []}
    ids_type = pa.list_(pa.list_(pa.int32()))
    out: dict[str, Any] = {}
    for key, name in (("input_ids", "ids"), ("token_type_ids", "types")):
        if key not in enc:
            continue
        nested = regroup(enc[key], sizes)
        out[f"pos_{name}"] = pa.array(nested[:n], type=ids_type)
        out[f"neg_{name}"] = pa.array(nested[n:], type=ids_type)
    return pa.table({**out, **carried_columns(batch)})
