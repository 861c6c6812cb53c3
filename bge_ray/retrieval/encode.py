"""Embedding texts with a model: how a model embeds (``EncoderSpec``, read from its directory), the
Ray Data actor that embeds batches (``TextEncoder``), and batched encoding in one process."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch
from transformers.utils import cached_file

from bge_ray.config.finetune import ICL_FIELDS, resolve_model_path
from bge_ray.data.icl import model_queries
from bge_ray.data.text import TextSpec
from bge_ray.errors import ConfigError
from bge_ray.model.embedder import Embedder
from bge_ray.model.m3 import M3Embedder
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.retrieval.m3 import encode_m3_texts

_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextSpec)}
M3_COLUMNS = ("sparse_ids", "sparse_weights", "colbert")  # TextEncoder's extra columns for a BGE-M3 spec


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of different lengths as one object column (Ray Data keeps them as variable-shaped tensors)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # one by one: numpy would stack arrays of equal shape
        out[i] = a
    return out


@dataclass(frozen=True)
class EncoderSpec:
    """How to embed texts with a model: its texts (instructions, lengths), pooling, normalisation,
    batch size and dtype (``auto``: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU)."""

    text: TextSpec
    pooling: str = "cls"
    normalize: bool = True
    batch_size: int = 64
    dtype: str = "auto"
    m3: bool = False  # also BGE-M3's sparse and ColBERT outputs (the model has their heads)
    m3_weights: tuple[float, float, float] = (1.0, 0.3, 1.0)  # the hybrid's dense, sparse, ColBERT weights

    @property
    def model(self) -> str:
        return self.text.tokenizer

    def replace(self, **changes: Any) -> EncoderSpec:
        """A copy with ``changes`` applied; TextSpec's fields (``query_max_len``...) go to ``text``."""
        text = {k: v for k, v in changes.items() if k in _TEXT_FIELDS}
        own = {k: v for k, v in changes.items() if k not in _TEXT_FIELDS}
        return dataclasses.replace(self, text=self.text.replace(**text), **own)


def _model_json(model: str, filename: str) -> dict | None:
    """A JSON file of a model directory or hub repository, or None when it has none."""
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        if not os.path.isfile(path):
            return None
    else:
        path = cached_file(model, filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sentence_transformers_spec(path: str) -> dict[str, Any]:
    """Pooling, normalisation and prompts from a sentence-transformers directory (empty if it is none)."""
    found: dict[str, Any] = {}
    pooling_cfg = _model_json(path, "1_Pooling/config.json")
    if pooling_cfg:
        found["pooling"] = ("mean" if pooling_cfg.get("pooling_mode_mean_tokens") else
                            "last_token" if pooling_cfg.get("pooling_mode_lasttoken") else "cls")
        modules = _model_json(path, "modules.json") or []
        found["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    prompts = (_model_json(path, "config_sentence_transformers.json") or {}).get("prompts") or {}
    found["query_instruction"] = prompts.get("query") or None
    found["passage_instruction"] = prompts.get("document") or prompts.get("passage") or None
    return found


def encoder_spec_for(model: str, **overrides: Any) -> EncoderSpec:
    """How ``model`` embeds, read from its directory: bge-ray's ``bge_ray.json``, else the
    sentence-transformers files, else FlagEmbedding's default (cls, normalised). ``overrides``
    (non-None values: ``pooling``, ``query_instruction``, ``passage_max_len``...) win."""
    path = resolve_model_path(model)
    meta = _model_json(path, "bge_ray.json")
    if meta and meta.get("task") == "reranker":
        raise ConfigError(f"{model} is a reranker (a cross-encoder), not an embedder: give it as the reranker "
                          "(bge-ray eval --reranker, eval_retriever takes an embedder)")
    if meta:
        found = {"pooling": meta["sentence_pooling_method"], "normalize": bool(meta["normalize_embeddings"]),
                 "query_instruction": meta.get("query_instruction_for_retrieval"),
                 "query_instruction_format": meta.get("query_instruction_format", "{}{}"),
                 "passage_instruction": meta.get("passage_instruction_for_retrieval"),
                 "passage_instruction_format": meta.get("passage_instruction_format", "{}{}")}
        trained = meta.get("training_config") or {}
        if meta.get("unified_finetuning") and trained.get("m3_score_weights"):
            found["m3_weights"] = tuple(float(w) for w in trained["m3_score_weights"])  # its ensemble's training
        if trained.get("icl"):  # queries end with the suffix it was trained with
            found["icl_suffix"] = trained.get("icl_suffix_str", ICL_FIELDS["icl_suffix_str"])
    else:
        found = _sentence_transformers_spec(path)
    found.update({k: v for k, v in overrides.items() if v is not None})
    return EncoderSpec(text=TextSpec(tokenizer=path)).replace(**found)


class TextEncoder:
    """A Ray Data actor (or a plain object): one model; embeds ``text`` batches as ``kind`` (query or passage)."""

    def __init__(self, spec: EncoderSpec, kind: str = "passage") -> None:
        self.spec, self.kind = spec, kind
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32
        if self.device.type == "cuda" and spec.dtype in ("auto", "bf16", "fp16"):
            dtype = torch.float16 if spec.dtype == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
        self.tokenizer = load_tokenizer(spec.model, None, spec.text.trust_remote_code)
        loading = {"pooling": spec.pooling, "normalize": spec.normalize, "trust_remote_code": spec.text.trust_remote_code,
                   "dtype": dtype}
        self.model = (M3Embedder.from_pretrained(spec.model, tokenizer=self.tokenizer, **loading) if spec.m3
                      else Embedder.from_pretrained(spec.model, **loading))
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.spec.m3:
            return {"_id": batch["_id"], "emb": self.embed(list(batch["text"]), self.kind)}
        formatted = self.spec.text.format(list(batch["text"]), self.kind)
        reps = encode_m3_texts(self.model, self.tokenizer, formatted, self.spec.text.max_len(self.kind),
                               self.spec.batch_size, self.device)
        return {"_id": batch["_id"], "emb": reps["dense"], **{k: _ragged(reps[k]) for k in M3_COLUMNS}}

    def embed(self, texts: list[str], kind: str, instructions: list[str | None] | None = None) -> np.ndarray:
        """Embed ``texts`` as queries or passages; ``instructions`` (per query) override the spec's."""
        formatted = self.spec.text.format(texts, kind, instructions)
        if kind == "query":
            formatted = model_queries(self.tokenizer, self.spec.text, formatted)
        return encode_texts(self.model, self.tokenizer, formatted, self.spec.text.max_len(kind), self.spec.batch_size,
                            self.device)


@torch.inference_mode()
def encode_texts(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Embed texts in length-sorted sub-batches (less padding); float32 numpy in input order."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    ids = enc["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        emb = model.encode(padded["input_ids"].to(device), padded["attention_mask"].to(device)).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def encode_dataset(ds: Any, spec: EncoderSpec, kind: str, use_gpu: bool, concurrency: int) -> Any:
    """``ds`` (``_id``, ``text``) -> ``_id``, ``emb`` on a pool of ``concurrency`` encoder actors."""
    return ds.map_batches(TextEncoder, fn_constructor_kwargs={"spec": spec, "kind": kind}, batch_format="numpy",
                          batch_size=max(spec.batch_size * 4, 256), compute=ray.data.ActorPoolStrategy(size=concurrency),
                          num_gpus=1 if use_gpu else 0, num_cpus=1 if not use_gpu else None)
