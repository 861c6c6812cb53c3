"""Write a fine-tuned model directory that transformers, FlagEmbedding and sentence-transformers load.

Layout::

    model/
      config.json, model.safetensors          # transformers save_pretrained
      tokenizer files                         # the tokenizer that was trained with
      modules.json, sentence_bert_config.json # sentence-transformers: Transformer -> Pooling [-> Normalize]
      1_Pooling/config.json                   # the pooling that was trained (cls / mean / last_token)
      2_Normalize/                            # only when normalize_embeddings
      config_sentence_transformers.json       # the query instruction as the "query" prompt; Matryoshka dims
      colbert_linear.pt, sparse_linear.pt     # BGE-M3's heads (unified_finetuning), where BGEM3FlagModel reads them
      bge_ray.json                            # pooling, normalisation, instructions, the resolved config

A reranker's folder (:func:`export_reranker`) holds the sequence classifier, its tokenizer and
``bge_ray.json`` (its task, instructions and lengths).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoModel, AutoModelForCausalLM

from bge_ray.model.lora import merged_model
from bge_ray.model.m3 import save_heads
from bge_ray.storage import strip_credentials
from bge_ray.version import __version__

METADATA_FILE = "bge_ray.json"
MERGED_SUBDIR = "merged_model"  # FlagEmbedding's name for the merged LoRA model


def prompt_prefix(fmt: str, instruction: str | None) -> str | None:
    """The instruction as a text prefix (sentence-transformers prompts are prefixes), if the format allows."""
    if instruction is None:
        return None
    marker = "\x00TEXT\x00"
    rendered = fmt.format(instruction, marker)
    return rendered[: -len(marker)] if rendered.endswith(marker) else None


def write_sentence_transformers_files(out_dir: str, hidden_size: int, pooling: str, normalize: bool,
                                      max_seq_length: int, query_prompt: str | None,
                                      passage_prompt: str | None, matryoshka_dims: list[int] | None = None) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(out_dir, "modules.json"), modules)
    _write_json(os.path.join(out_dir, "sentence_bert_config.json"),
                {"max_seq_length": max_seq_length, "do_lower_case": False})
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    _write_json(os.path.join(out_dir, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last_token",
        "include_prompt": True,
    })
    prompts = {}
    if query_prompt:
        prompts["query"] = query_prompt
    if passage_prompt:
        prompts["document"] = passage_prompt
    _write_json(os.path.join(out_dir, "config_sentence_transformers.json"), {
        "__version__": {"bge_ray": __version__},
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
        **({"matryoshka_dims": matryoshka_dims} if matryoshka_dims else {}),  # load with truncate_dim=<one of them>
    })


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_transformer(hf_model: Any, tokenizer: Any, state_dict: dict, out_dir: str) -> None:
    """``save_pretrained`` of the model (safetensors) with ``state_dict``, and of the tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    if {v.dtype for v in state_dict.values() if v.is_floating_point()} == {torch.float32}:
        # the fp32 master weights of a bf16/fp16 run: the config must not tell loaders to cast them down
        config_path = os.path.join(out_dir, "config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("dtype", "float32") != "float32" or config.get("torch_dtype", "float32") != "float32":
            config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})
            _write_json(config_path, config)
    tokenizer.save_pretrained(out_dir)


def reranker_metadata(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """``bge_ray.json`` of a reranker: its task and kind, instructions, lengths (and an LLM reranker's
    separator), the resolved config."""
    return {
        "bge_ray_version": __version__,
        "task": "reranker",
        **{k: cfg_dict.get(k) for k in ("model_type", "query_instruction_for_rerank", "query_instruction_format",
                                        "passage_instruction_for_rerank", "passage_instruction_format",
                                        "query_max_len", "passage_max_len")},
        **({"sep_token": cfg_dict["sep_token"]} if cfg_dict.get("model_type") == "decoder" else {}),
        "training_config": strip_credentials(cfg_dict),
    }


def export_reranker(hf_model: Any, tokenizer: Any, state_dict: dict, out_dir: str, cfg_dict: dict[str, Any]) -> str:
    """A reranker's model folder: the one-label sequence classifier (sentence-transformers' ``CrossEncoder``
    and FlagEmbedding's ``FlagReranker`` load it) or an LLM reranker's causal LM (``FlagLLMReranker``
    loads it), its tokenizer, and bge-ray's metadata."""
    save_transformer(hf_model, tokenizer, state_dict, out_dir)
    _write_json(os.path.join(out_dir, METADATA_FILE), reranker_metadata(cfg_dict))
    return out_dir


def write_embedder_files(out_dir: str, hidden_size: int, cfg_dict: dict[str, Any], extra: dict[str, Any]) -> None:
    """An embedder's sentence-transformers files and ``bge_ray.json`` (how it pools and normalises, its
    instructions and lengths, the resolved config, and ``extra``)."""
    matryoshka = list(cfg_dict["mrl_dims"]) if cfg_dict.get("use_mrl") else None
    write_sentence_transformers_files(
        out_dir, hidden_size=hidden_size, pooling=cfg_dict["sentence_pooling_method"],
        normalize=bool(cfg_dict["normalize_embeddings"]), max_seq_length=int(cfg_dict["passage_max_len"]),
        query_prompt=prompt_prefix(cfg_dict["query_instruction_format"], cfg_dict["query_instruction_for_retrieval"]),
        passage_prompt=prompt_prefix(cfg_dict["passage_instruction_format"],
                                     cfg_dict["passage_instruction_for_retrieval"]),
        matryoshka_dims=matryoshka)
    _write_json(os.path.join(out_dir, METADATA_FILE), {
        "bge_ray_version": __version__,
        "sentence_pooling_method": cfg_dict["sentence_pooling_method"],
        "normalize_embeddings": bool(cfg_dict["normalize_embeddings"]),
        **{k: cfg_dict[k] for k in ("query_instruction_for_retrieval", "query_instruction_format",
                                    "passage_instruction_for_retrieval", "passage_instruction_format",
                                    "query_max_len", "passage_max_len")},
        "matryoshka_dims": matryoshka,
        **extra,  # unified_finetuning: BGE-M3's sparse and ColBERT heads beside the transformer
        "training_config": strip_credentials(cfg_dict),
    })


def export_model(hf_model: Any, tokenizer: Any, state_dict: dict, out_dir: str, cfg_dict: dict[str, Any],
                 heads: dict | None = None) -> str:
    """Save weights (safetensors), tokenizer, sentence-transformers files and bge-ray metadata; with
    ``heads`` (a state dict with ``colbert_linear.*`` and ``sparse_linear.*``) BGE-M3's head files too."""
    if heads is not None:
        os.makedirs(out_dir, exist_ok=True)
        save_heads(heads, out_dir)
    save_transformer(hf_model, tokenizer, state_dict, out_dir)
    write_embedder_files(out_dir, int(hf_model.config.hidden_size), cfg_dict, {"unified_finetuning": heads is not None})
    return out_dir


def export_lora(peft_model: Any, tokenizer: Any, state_dict: dict, out_dir: str, cfg_dict: dict[str, Any]) -> str:
    """A LoRA run's model folder, laid out as FlagEmbedding's decoder runners leave ``output_dir``: the
    adapters (peft's ``save_pretrained``, with the token embeddings where tokens were added), the
    tokenizer, an embedder's sentence-transformers files and bge-ray's metadata; with
    ``save_merged_lora_model``, ``merged_model/``: the adapters merged into the base model, a full export."""
    reranker = cfg_dict.get("task") == "reranker"
    os.makedirs(out_dir, exist_ok=True)
    peft_model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    base = {"lora_base_model": cfg_dict["model_name_or_path"]}
    if reranker:
        _write_json(os.path.join(out_dir, METADATA_FILE), {**reranker_metadata(cfg_dict), **base})
    else:
        write_embedder_files(out_dir, int(peft_model.config.hidden_size), cfg_dict, {"unified_finetuning": False, **base})
    if cfg_dict["save_merged_lora_model"]:
        merged = merged_model(out_dir, cfg_dict["model_name_or_path"], len(tokenizer), cache_dir=cfg_dict.get("cache_dir"),
                              trust_remote_code=bool(cfg_dict.get("trust_remote_code")),
                              auto_class=AutoModelForCausalLM if reranker else AutoModel)
        (export_reranker if reranker else export_model)(merged, tokenizer, merged.state_dict(),
                                                         os.path.join(out_dir, MERGED_SUBDIR), cfg_dict)
    return out_dir


def consolidated_state_dict(engine: Any, zero_stage: int, mixed_precision: bool) -> dict | None:
    """The full weights on rank 0 (None elsewhere), keyed as ``engine.module``'s (``model.*`` the
    transformer's, ``colbert_linear.*`` / ``sparse_linear.*`` BGE-M3's heads).

    A collective under ZeRO-3 and under mixed precision: every rank must call it. With bf16/fp16
    under ZeRO 0-2 these are the fp32 master weights, not their 16-bit copies, so the exported
    model is as precise as the optimizer's.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if mixed_precision and zero_stage < 3:
        full = {name: safe_get_full_fp32_param(param) for name, param in engine.module.named_parameters()}
        if rank != 0:
            return None
        # parameters without an fp32 master (frozen ones, optimizers that keep none) and buffers as they are
        sd = {k: (full[k].float() if full.get(k) is not None else v) for k, v in engine.module.state_dict().items()}
    elif zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    if rank != 0 or sd is None:
        return None
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def transformer_state(state_dict: dict) -> dict:
    """The transformer's part of :func:`consolidated_state_dict`, keyed as its own ``state_dict``."""
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
