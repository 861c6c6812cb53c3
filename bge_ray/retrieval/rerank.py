"""Reranking: a cross-encoder re-scores each query's top ``rerank_top_k`` retrieved passages
(FlagEmbedding's evaluation: ``reranker_name_or_path``, ``rerank_top_k``), on Ray Data actors.

A pair is built as FlagEmbedding's ``FlagReranker`` builds it: the query cut to ``query_max_length``
tokens (default three quarters of ``max_length``), the passage to ``max_length``, the pair (with the
tokenizer's special tokens) to ``max_length`` by shortening the passage; a reranker bge-ray trained
is cut as in its training (its ``bge_ray.json``) unless a length is given. Instructions: the flags
given, else those the reranker was trained with, else none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from bge_ray.config.finetune import resolve_model_path
from bge_ray.console import ProgressLine
from bge_ray.data.collate import pad_ids
from bge_ray.data.pairs import LLM_PROMPT, llm_pair_inputs, pair_inputs
from bge_ray.data.text import apply_instruction
from bge_ray.errors import ConfigError
from bge_ray.model.reranker import layered_reranker, yes_token
from bge_ray.model.tokenizer import is_decoder_only, load_tokenizer

METADATA_FILE = "bge_ray.json"


@dataclass(frozen=True, kw_only=True)
class RerankSpec:
    """How a reranker scores (query, passage) pairs (fields by name only). Picklable, for Ray actors."""

    model: str
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction: str | None = None
    passage_instruction_format: str = "{}{}"
    max_length: int = 512
    query_max_length: int | None = None
    passage_max_length: int | None = None  # a passage's own cut before the pair's (default max_length)
    batch_size: int = 32
    trust_remote_code: bool = False
    prompt: str | None = None  # a decoder-only (LLM) reranker's question (default: FlagEmbedding's)
    sep: str = "\n"  # what an LLM reranker reads between query, passage and prompt

    @property
    def query_tokens(self) -> int:
        return self.query_max_length if self.query_max_length is not None else self.max_length * 3 // 4

    @property
    def passage_tokens(self) -> int:
        return self.passage_max_length if self.passage_max_length is not None else self.max_length


def rerank_spec_for(model: str, **overrides: Any) -> RerankSpec:
    """The spec of ``model`` (a local path or hub id): the instructions and pair cuts it was trained with
    where bge-ray trained it, then ``overrides`` (fields of :class:`RerankSpec`, None meaning "not given";
    a length given means FlagReranker's rule at that length).

    Raises:
        ConfigError: ``max_length`` or ``batch_size`` below 1, a query budget beyond ``max_length``.
    """
    path = resolve_model_path(model)
    values: dict[str, Any] = {"model": path}
    meta_path = os.path.join(path, METADATA_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        for ours, theirs in (("query_instruction", "query_instruction_for_rerank"),
                             ("query_instruction_format", "query_instruction_format"),
                             ("passage_instruction", "passage_instruction_for_rerank"),
                             ("passage_instruction_format", "passage_instruction_format")):
            if meta.get(theirs) is not None:
                values[ours] = meta[theirs]
        q, p = meta.get("query_max_len"), meta.get("passage_max_len")
        if meta.get("sep_token") is not None:
            values["sep"] = meta["sep_token"]
        if meta.get("task") == "reranker" and q and p:  # pairs cut as in training (data/pairs.py)
            values.update(max_length=q + p, query_max_length=q + p // 4, passage_max_length=p + q // 2)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "max_length" in given or "query_max_length" in given:  # FlagReranker's rule, as asked
        values.pop("passage_max_length", None)
        values.pop("query_max_length", None)
    values.update(given)
    spec = RerankSpec(**values)
    if spec.max_length < 4 or spec.batch_size < 1:
        raise ConfigError(f"reranker_max_length must be >= 4 and reranker_batch_size >= 1, got {spec.max_length} "
                          f"and {spec.batch_size}")
    if not 0 < spec.query_tokens < spec.max_length:
        raise ConfigError(f"reranker_query_max_length must be between 1 and reranker_max_length "
                          f"({spec.max_length}), got {spec.query_tokens}")
    return spec


def reranker_kind(spec: RerankSpec) -> str:
    """``cross-encoder`` (a one-logit sequence classifier) or ``llm`` (a decoder-only model scoring with its
    "Yes" logit, as FlagEmbedding's ``FlagLLMReranker``).

    Raises:
        ConfigError: an unreadable config, a layerwise or lightweight LLM reranker, or a prompt for a
            cross-encoder.
    """
    try:
        config = AutoConfig.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reranker {spec.model}: its config cannot be read ({e})") from None
    refused = layered_reranker(config, f"reranker {spec.model}")
    if refused:
        raise ConfigError(refused)
    if not is_decoder_only(config):
        if spec.prompt is not None:
            raise ConfigError(f"prompt is read by decoder-only (LLM) rerankers; {spec.model} is a cross-encoder, "
                              "which would ignore it: drop prompt")
        return "cross-encoder"
    try:
        yes_token(AutoTokenizer.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code), spec.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return "llm"


class PairScorer:
    """A reranker scoring (query, passage) pairs, longest first in batches: a cross-encoder's one logit,
    or an LLM reranker's "Yes" logit after the pair and its prompt (FlagEmbedding's ``FlagLLMReranker``,
    with each pair's positions counted from its first real token, so its score does not depend on the
    padding its batch needs)."""

    def __init__(self, spec: RerankSpec, device: torch.device | None = None) -> None:
        self.spec = spec
        self.kind = reranker_kind(spec)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        loading = {"trust_remote_code": spec.trust_remote_code, "dtype": dtype, "use_safetensors": None}
        if self.kind == "llm":  # its tokenizer as FlagLLMReranker loads it (no EOS appended)
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(spec.model, **loading)
            self.yes = yes_token(self.tokenizer, spec.model)
        else:
            self.tokenizer = load_tokenizer(spec.model, None, spec.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(spec.model, **loading)
            if self.model.config.num_labels != 1:
                raise ConfigError(f"reranker {spec.model} has {self.model.config.num_labels} labels; a cross-encoder "
                                  "reranker gives one relevance logit")
        self.model.to(self.device).eval()

    def _inputs(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        s = self.spec
        queries = [apply_instruction(q, s.query_instruction, s.query_instruction_format) for q in queries]
        passages = [apply_instruction(p, s.passage_instruction, s.passage_instruction_format) for p in passages]
        if self.kind == "llm":  # FlagLLMReranker's cuts, or a bge-ray export's as trained
            trained = s.passage_max_length is not None
            return {"input_ids": llm_pair_inputs(
                self.tokenizer, queries, passages, [s.prompt if s.prompt is not None else LLM_PROMPT] * len(queries),
                s.query_tokens, s.passage_tokens, s.max_length, s.sep, tail_inside=trained)}
        return pair_inputs(self.tokenizer, queries, passages, s.query_tokens, s.passage_tokens, s.max_length)

    def _scores(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        if self.kind == "cross-encoder":
            return self.model(**batch).logits[:, 0]
        mask = batch["attention_mask"]  # padded on the left: the last position is every pair's last token
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                            logits_to_keep=1).logits
        return logits[:, -1, self.yes]

    @torch.inference_mode()
    def __call__(self, queries: list[str], passages: list[str]) -> np.ndarray:
        enc = self._inputs(queries, passages)
        ids = enc["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros(len(ids), dtype=np.float64)
        pad = self.tokenizer.pad_token_id or 0
        side = "left" if self.kind == "llm" else self.tokenizer.padding_side
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start:start + self.spec.batch_size]
            batch_ids, mask = pad_ids([ids[i] for i in idx], pad, side)
            inputs = {"input_ids": batch_ids, "attention_mask": mask}
            if "token_type_ids" in enc:
                inputs["token_type_ids"] = pad_ids([enc["token_type_ids"][i] for i in idx], 0, side)[0]
            out[idx] = self._scores(inputs).float().cpu().numpy()
        return out


class RerankActor:
    """A Ray Data actor: adds ``score`` to a batch of ``query`` / ``passage`` pairs."""

    def __init__(self, spec: RerankSpec) -> None:
        self.scorer = PairScorer(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["score"] = self.scorer(list(batch["query"]), list(batch["passage"]))
        return batch


def rerank_run(run: dict[str, dict[str, float]], queries: dict[str, str], corpus: Any, spec: RerankSpec,
               top_k: int, use_gpu: bool = False, concurrency: int = 1) -> dict[str, dict[str, float]]:
    """Each query's ``top_k`` passages of ``run`` (qid -> {doc id: score}) scored by the reranker: a run
    of those passages alone, with the reranker's scores. ``corpus``: a Ray Dataset of ``_id`` and ``text``."""
    tops = {q: sorted(docs, key=docs.get, reverse=True)[:top_k] for q, docs in run.items()}
    wanted = {d for docs in tops.values() for d in docs}
    texts = {}
    for batch in corpus.select_columns(["_id", "text"]).iter_batches(batch_size=4096, batch_format="numpy"):
        texts.update((str(i), t) for i, t in zip(batch["_id"], batch["text"], strict=True) if str(i) in wanted)
    pairs = [{"qid": q, "did": d, "query": queries[q], "passage": texts[d]} for q, docs in tops.items() for d in docs]
    if not pairs:
        return {q: {} for q in run}
    scored = ray.data.from_items(pairs).map_batches(
        RerankActor, fn_constructor_kwargs={"spec": spec}, batch_size=max(spec.batch_size, 64),
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=1 if use_gpu else 0,
        num_cpus=None if use_gpu else 1)
    out: dict[str, dict[str, float]] = {q: {} for q in run}
    name = os.path.basename(os.path.normpath(spec.model))
    with ProgressLine(f"rerank {name}: top {top_k} of {len(tops):,} queries", len(pairs), "pairs") as progress:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for q, d, score in zip(batch["qid"], batch["did"], batch["score"], strict=True):
                out[str(q)][str(d)] = float(score)
            progress.add(len(batch["qid"]))
    return out
