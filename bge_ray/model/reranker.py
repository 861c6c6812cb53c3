"""The reranker: a cross-encoder (transformers ``AutoModelForSequenceClassification`` with one label)
that reads a query and a passage as one sequence and gives one relevance logit, and its loss with
FlagEmbedding's semantics (its encoder-only reranker runner).

Shapes: ``logits`` is (B*G,), laid out in groups of G = train_group_size: entry ``i*G`` is query i's
positive, ``i*G+1 .. i*G+G-1`` its negatives. The loss is a cross-entropy over each query's group
(the positive is the target), plus, with teacher scores (B, G), the soft cross-entropy
``-sum(softmax(teacher) * log_softmax(group logits))`` averaged over queries. Each worker's loss is
its own groups' mean; DeepSpeed averages the gradients over workers (as DDP does for FlagEmbedding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from bge_ray.model.embedder import freeze_position_embeddings, set_attention_dropout
from bge_ray.model.tokenizer import is_decoder_only


def reranker_config(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False,
                    attention_dropout: float | None = None) -> Any:
    """The model's config with one label (FlagEmbedding's ``num_labels=1``) and, when given, its
    attention dropout set.

    Raises:
        ValueError: an unreadable config, a decoder-only model (FlagEmbedding trains those with its
            decoder runners, from the LM head's "Yes" logit: not supported yet), or an attention
            dropout the config has no name for.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                            num_labels=1)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name_or_path}: its config cannot be read ({e})") from None
    if is_decoder_only(config):
        raise ValueError(f"{name_or_path} is a {config.model_type} model, not an encoder: bge-ray train-reranker trains "
                         "encoder-only cross-encoders (BERT, XLM-RoBERTa, bge-reranker-base/large...); decoder-only "
                         "rerankers (FlagEmbedding's decoder_only runners) are not supported yet")
    if attention_dropout is not None:
        set_attention_dropout(config, attention_dropout, name_or_path)
    return config


def layered_reranker(config: Any, name: str) -> str | None:
    """Why ``name`` (its config) cannot be trained or scored, when it is a layerwise or lightweight LLM
    reranker (bge-reranker-v2-minicpm-layerwise, bge-reranker-v2.5-gemma2-lightweight); else None."""
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "layerwise" not in arch.lower() and "costwise" not in arch.lower():
        return None
    return (f"{name} is a layerwise / lightweight LLM reranker ({arch}): not supported. bge-ray has no scorer or "
            "trainer for its per-layer heads; its model code (FlagEmbedding's modeling_minicpm_reranker.py / "
            "gemma_model.py, the checkpoints' remote code) imports transformers.modeling_attn_mask_utils, which "
            "transformers 5 removed, so under transformers 5 it runs nowhere (FlagEmbedding 1.4.2's own classes fail "
            "alike). Decoder-only rerankers scored by their \"Yes\" logit (bge-reranker-v2-gemma style) are supported")


class Reranker(nn.Module):
    """A one-label sequence classifier; ``forward`` returns one logit per (query, passage) pair."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False,
                        attention_dropout: float | None = None, seed: int | None = None) -> Reranker:
        """Load the model; a classification head the checkpoint lacks (a plain encoder) is drawn from
        ``seed``, alike on every worker, leaving the global random state as it was."""
        config = reranker_config(name_or_path, cache_dir, trust_remote_code, attention_dropout)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                use_safetensors=None)
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra).logits[:, 0]

    def freeze_position_embeddings(self) -> int:
        return freeze_position_embeddings(self.model)


def rerank_loss(logits: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over each query's group (its positive first), plus the soft cross-entropy against
    ``softmax(teacher_scores)`` when given (see the module docstring)."""
    grouped = logits.view(-1, group_size)
    target = torch.zeros(grouped.size(0), dtype=torch.long, device=grouped.device)
    loss = F.cross_entropy(grouped, target)
    if teacher_scores is not None:
        targets = torch.softmax(teacher_scores.detach().to(grouped.dtype).view(grouped.size(0), -1), dim=-1)
        loss = loss - torch.mean(torch.sum(F.log_softmax(grouped, dim=-1) * targets, dim=-1))
    return loss


class LLMReranker(nn.Module):
    """A decoder-only (LLM) reranker, FlagEmbedding's ``CrossDecoderModel``: a causal LM reading the pair
    and its prompt (:func:`bge_ray.data.pairs.llm_pair_inputs`, padded on the left); the relevance logit is
    its next token's "Yes" logit. ``forward`` returns one logit per pair."""

    def __init__(self, model: nn.Module, yes_id: int) -> None:
        super().__init__()
        self.model = model
        self.yes_id = yes_id

    @classmethod
    def from_pretrained(cls, name_or_path: str, yes_id: int, cache_dir: str | None = None,
                        trust_remote_code: bool = False, attention_dropout: float | None = None) -> LLMReranker:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        if attention_dropout is not None:
            set_attention_dropout(config, attention_dropout, name_or_path)
        config.use_cache = False
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, cache_dir=cache_dir,
                                                     trust_remote_code=trust_remote_code, use_safetensors=None)
        return cls(model, yes_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002 (a cross-encoder's)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # each pair's from its first token
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, self.yes_id]

    def freeze_position_embeddings(self) -> int:
        return freeze_position_embeddings(self.model)


def yes_token(tokenizer: Any, name: str = "the model") -> int:
    """The id of "Yes", whose logit an LLM reranker's score is (FlagEmbedding's ``yes_loc``).

    Raises:
        ValueError: the tokenizer splits "Yes" (FlagEmbedding trains on its last piece and scores with its
            first, so the trained model would be scored with a token it was not trained on).
    """
    ids = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{name}'s tokenizer splits \"Yes\" into {len(ids)} tokens; an LLM reranker's score is the "
                         "logit of \"Yes\" as one token (FlagEmbedding trains on its last piece and scores with its "
                         "first, which disagree here)")
    return ids[0]
