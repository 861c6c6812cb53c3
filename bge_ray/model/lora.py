"""LoRA adapters (peft) on an embedder's transformer, as FlagEmbedding's decoder runners add them, the
tokens it may add, and the merged model an adapter export becomes.

What a worker builds must be the same on every worker (ZeRO-3 keeps each rank's own shard of what it
built): new embedding rows and the adapters' first weights are drawn from ``seed`` inside a forked
random state.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel

from bge_ray.config.finetune import FinetuneConfig

EMBEDDING_NAMES = ("embed_tokens",)  # what FlagEmbedding drops from target_modules when no token was added


def lora_config(rank: int, alpha: float, dropout: float, target_modules: list[str],
                modules_to_save: list[str] | None, causal_lm: bool = False) -> LoraConfig:
    """FlagEmbedding's decoder runners' ``LoraConfig``: a feature-extraction task (an embedder's) or a
    causal LM (an LLM reranker's)."""
    task = TaskType.CAUSAL_LM if causal_lm else TaskType.FEATURE_EXTRACTION
    return LoraConfig(task_type=task, inference_mode=False, r=rank, lora_alpha=alpha,
                      lora_dropout=dropout, target_modules=list(target_modules),
                      modules_to_save=list(modules_to_save) if modules_to_save else None)


def lora_config_of(cfg: FinetuneConfig, causal_lm: bool = False) -> LoraConfig:
    """:func:`lora_config` with a fine-tune's LoRA fields."""
    return lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.modules_to_save,
                       causal_lm=causal_lm)


def grow_embeddings(model: nn.Module, size: int, seed: int) -> bool:
    """Grow the input embeddings to ``size`` rows (tokens were added), the new rows drawn from ``seed``
    (transformers' mean resizing); whether they grew."""
    if model.get_input_embeddings().weight.shape[0] >= size:
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(size)
    return True


def add_lora(model: nn.Module, config: LoraConfig, seed: int) -> PeftModel:
    """``model`` with LoRA adapters (A drawn from ``seed``, B zero: the model is unchanged at first)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def module_names(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> set[str]:
    """The last name part of every module of the model (built on the meta device: no weights read)."""
    config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    return {name.rpartition(".")[2] for name, _ in model.named_modules() if name}


def lora_targets(name_or_path: str, targets: list[str], modules_to_save: list[str] | None, tokens_added: bool,
                 cache_dir: str | None = None, trust_remote_code: bool = False) -> tuple[list[str], list[str]]:
    """The target modules LoRA will adapt in this model, and the names of ``targets`` it has no module for.

    As FlagEmbedding's runner: ``embed_tokens`` is dropped from the targets unless tokens were added.

    Raises:
        ValueError: no target names a module of the model, or a ``modules_to_save`` entry names none.
    """
    names = module_names(name_or_path, cache_dir, trust_remote_code)
    kept = [t for t in targets if tokens_added or t not in EMBEDDING_NAMES]
    found = [t for t in kept if t in names]
    if not found:
        sample = ", ".join(sorted(n for n in names if not n.isdigit())[:20])
        raise ValueError(f"target_modules {targets}: {name_or_path} has no module of these names; its modules "
                         f"include {sample}")
    unknown = [m for m in modules_to_save or [] if m not in names]
    if unknown:
        raise ValueError(f"modules_to_save {unknown}: {name_or_path} has no module of these names")
    return found, [t for t in kept if t not in names]


def merged_model(adapter_dir: str, base: str, vocab_size: int, cache_dir: str | None = None,
                 trust_remote_code: bool = False, auto_class: Any = AutoModel) -> Any:
    """The base model (loaded with ``auto_class``) with an adapter export's adapters merged in (peft's
    ``merge_and_unload``), its embeddings grown to ``vocab_size`` first where tokens were added."""
    model = auto_class.from_pretrained(base, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # the adapter file holds the grown rows
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
