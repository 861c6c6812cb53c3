"""The embedder: a transformers ``AutoModel`` plus pooling and optional L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from bge_ray.config.finetune import POOLING_METHODS


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Sentence embedding from token states, correct under left or right padding.

    ``cls``: the first real token; ``last_token``: the last real token; ``mean``: the mean over
    real tokens.
    """
    mask = attention_mask.to(hidden.dtype)
    if method == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if method == "cls":
        first = attention_mask.long().argmax(dim=1)
        return hidden[rows, first]
    if method == "last_token":
        seq_len = attention_mask.size(1)
        last = seq_len - 1 - attention_mask.long().flip(dims=[1]).argmax(dim=1)
        return hidden[rows, last]
    raise ValueError(f"unknown pooling method {method!r}; use {', '.join(POOLING_METHODS)}")


def freeze_position_embeddings(model: nn.Module) -> int:
    """FlagEmbedding's ``fix_position_embedding``: stop training position embeddings; how many were."""
    n = 0
    for name, param in model.named_parameters():
        if "position_embeddings" in name:
            param.requires_grad_(False)
            n += 1
    return n


# what transformers configs call the dropout on attention probabilities (BERT/XLM-R, most others, GPT-2)
ATTENTION_DROPOUT_NAMES = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def set_attention_dropout(config: Any, value: float, name_or_path: str) -> Any:
    """``config`` with its dropout on attention probabilities set to ``value``, under every name it uses.

    Raises:
        ValueError: the config names no attention dropout.
    """
    names = [n for n in ATTENTION_DROPOUT_NAMES if hasattr(config, n)]
    if not names:
        raise ValueError(f"{name_or_path}: its config names no attention dropout "
                         f"({', '.join(ATTENTION_DROPOUT_NAMES)}); leave attention_dropout unset")
    for n in names:
        setattr(config, n, value)
    return config


def check_matryoshka_dims(name_or_path: str, dims: list[int], cache_dir: str | None = None,
                          trust_remote_code: bool = False) -> None:
    """Fail before any cluster work where a Matryoshka dim exceeds the model's embedding size
    (FlagEmbedding cuts it to the full size with a warning, so that dim trains the full size twice).

    Raises:
        ValueError: a dim larger than the model's ``hidden_size``, or a model whose config cannot be read.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(f"{name_or_path}: its config cannot be read to check mrl_dims against its size ({e})") from None
    size = getattr(config, "hidden_size", None)
    if size is not None and max(dims) > size:
        raise ValueError(f"mrl_dims {dims}: {name_or_path} embeds in {size} dimensions; list sizes up to {size}")


class Embedder(nn.Module):
    """Encoder + pooling (+ normalisation). ``forward`` returns (queries, passages) embeddings."""

    def __init__(self, model: nn.Module, pooling: str = "cls", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in POOLING_METHODS:
            raise ValueError(f"unknown pooling method {pooling!r}; use {', '.join(POOLING_METHODS)}")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    @classmethod
    def from_pretrained(cls, name_or_path: str, pooling: str = "cls", normalize: bool = True,
                        cache_dir: str | None = None, trust_remote_code: bool = False,
                        attn_implementation: str | None = None, attention_dropout: float | None = None,
                        **kwargs: Any) -> Embedder:
        extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if attention_dropout is not None:
            config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
            extra["config"] = set_attention_dropout(config, attention_dropout, name_or_path)
        model = AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                          use_safetensors=None, **extra, **kwargs)
        return cls(model, pooling=pooling, normalize=normalize)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        emb = pool(out.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb

    def forward(self, q_input_ids: torch.Tensor | None, q_attention_mask: torch.Tensor | None,
                p_input_ids: torch.Tensor | None = None, p_attention_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(query embeddings, passage embeddings); a side given as None is skipped (None)."""
        q = self.encode(q_input_ids, q_attention_mask) if q_input_ids is not None else None
        p = self.encode(p_input_ids, p_attention_mask) if p_input_ids is not None else None
        return q, p

    def freeze_position_embeddings(self) -> int:
        return freeze_position_embeddings(self.model)
