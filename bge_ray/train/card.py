"""The model card: ``README.md`` in every exported model directory, in the sentence-transformers /
Hugging Face style: base model, training data, the hyperparameters that matter, the evaluation
(zero-shot, best, final), how to load it in sentence-transformers, FlagEmbedding and transformers,
and the library versions. Credentials never reach it."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from bge_ray.config.finetune import EMBEDDER_ONLY, RERANKER_ONLY
from bge_ray.data.text import apply_instruction
from bge_ray.storage import strip_credentials
from bge_ray.train.export import MERGED_SUBDIR, prompt_prefix
from bge_ray.version import __version__

CARD_FILE = "README.md"
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "num_workers",
                   "gradient_accumulation_steps", "train_group_size", "temperature", "sentence_pooling_method",
                   "normalize_embeddings", "query_max_len", "passage_max_len", "query_instruction_for_retrieval",
                   "passage_instruction_for_retrieval", "negatives_cross_device", "knowledge_distillation",
                   "kd_loss_type", "warmup_ratio", "warmup_steps", "weight_decay", "deepspeed", "bf16", "fp16",
                   "sub_batch_size", "attention_dropout", "seed", "mrl_dims", "mrl_weights", "unified_finetuning",
                   "use_self_distill", "colbert_dim")
LIBRARIES = ("torch", "transformers", "ray", "deepspeed", "sentence-transformers", "FlagEmbedding")


def _versions() -> list[str]:
    out = [f"bge-ray {__version__}"]
    for name in LIBRARIES:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _eval_table(evals: dict[str, dict[str, Any]], metric: str) -> list[str]:
    """One row per metric, one column per measurement (``zero-shot``, ``best``, ``final``...)."""
    columns = [(name, e) for name, e in evals.items() if e]
    if not columns:
        return ["No evaluation set was given (`eval_data`), so none was measured."]
    header = "| metric | " + " | ".join(f"{name}{'' if e.get('step') is None else ' (step ' + str(e['step']) + ')'}"
                                          for name, e in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    keys = [metric] + [k for k in ("ndcg@10", "recall@100", "mrr@10", "map@10") if k != metric]
    for key in keys:
        values = [e.get(key) for _, e in columns]
        if any(v is not None for v in values):
            lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |")
    return lines


def _usage(model_dir: str, cfg: dict[str, Any]) -> list[str]:
    pooling, normalize = cfg["sentence_pooling_method"], bool(cfg["normalize_embeddings"])
    instruction, fmt = cfg.get("query_instruction_for_retrieval"), cfg.get("query_instruction_format", "{}{}")
    query = "what causes tides"
    as_prompt = prompt_prefix(fmt, instruction) is not None  # the export names it as the "query" prompt
    st_query = f'["{query}"], prompt_name="query"' if as_prompt else repr([apply_instruction(query, instruction, fmt)])
    fe_inst = f", query_instruction_for_retrieval={instruction!r}, query_instruction_format={fmt!r}" if instruction else ""
    # FlagEmbedding's LLM embedder class pools the last token (its encoder class cannot)
    flag_class = "FlagLLMModel" if pooling == "last_token" else "FlagModel"
    fe_args = f"normalize_embeddings={normalize}{fe_inst}" + ("" if flag_class == "FlagLLMModel" else
                                                             f", pooling_method={pooling!r}")
    if cfg.get("icl"):  # FlagEmbedding's in-context example embedder class
        flag_class, fe_args = "FlagICLModel", f"normalize_embeddings={normalize}{fe_inst}, suffix={cfg['icl_suffix_str']!r}"
    if cfg.get("use_lora") and cfg.get("save_merged_lora_model"):
        model_dir = f"{model_dir.rstrip('/')}/{MERGED_SUBDIR}"
    return [
        "```python",
        f'model_dir = "{model_dir}"',
        "",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(model_dir)",
        f"queries = model.encode({st_query})",
        'passages = model.encode(["Tides are caused by the moon\'s gravity."])',
        "print(model.similarity(queries, passages))",
        "```",
        "",
        "FlagEmbedding:",
        "",
        "```python",
        f"from FlagEmbedding import {flag_class}",
        f"model = {flag_class}(model_dir, {fe_args})",
        "```",
        "",
        *_icl_note(cfg),
        "transformers (queries with their instruction, pooling as trained):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "from bge_ray.model.embedder import pool",
        "tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)",
        f"batch = tokenizer({[apply_instruction(query, instruction, fmt)]!r}, padding=True, return_tensors=\"pt\")",
        f"embedding = pool(model(**batch).last_hidden_state, batch[\"attention_mask\"], {pooling!r})",
        *(["embedding = torch.nn.functional.normalize(embedding, dim=-1)"] if normalize else []),
        "```",
    ]


def _icl_note(cfg: dict[str, Any]) -> list[str]:
    if not cfg.get("icl"):
        return []
    return [f"Trained with in-context examples (FlagEmbedding's icl runner): every query ends with "
            f"`{cfg['icl_suffix_str']!r}`; append it to queries in sentence-transformers and transformers. "
            "FlagICLModel's `examples_for_task` (a list of `instruct` / `query` / `response` dicts) puts examples "
            "before them.", ""]


def _llm_reranker_usage(model_dir: str, cfg: dict[str, Any]) -> list[str]:
    if cfg.get("use_lora") and cfg.get("save_merged_lora_model"):
        model_dir = f"{model_dir.rstrip('/')}/{MERGED_SUBDIR}"
    inst = ", ".join(f"{k}={cfg.get(k)!r}" for k in ("query_instruction_for_rerank", "passage_instruction_for_rerank"))
    return [
        "```python",
        f'model_dir = "{model_dir}"',
        "",
        "from FlagEmbedding import FlagLLMReranker",
        f"reranker = FlagLLMReranker(model_dir, {inst})  # the instructions it was trained with",
        "print(reranker.compute_score([['what causes tides', \"Tides are caused by the moon's gravity.\"]]))",
        "```",
        "",
        "The score is the next token's \"Yes\" logit after the pair and the prompt (FlagEmbedding's question unless "
        f"a row gave its own); pairs of {cfg['query_max_len']} + {cfg['passage_max_len']} tokens were trained on.",
    ]


def _reranker_usage(model_dir: str, cfg: dict[str, Any]) -> list[str]:
    if cfg.get("model_type") == "decoder":
        return _llm_reranker_usage(model_dir, cfg)
    fmt = cfg.get("query_instruction_format", "{}{}")
    query = apply_instruction("what causes tides", cfg.get("query_instruction_for_rerank"), fmt)
    passage = apply_instruction("Tides are caused by the moon's gravity.", cfg.get("passage_instruction_for_rerank"),
                                cfg.get("passage_instruction_format", "{}{}"))
    pair = f"[[{query!r}, {passage!r}]]"
    return [
        "```python",
        f'model_dir = "{model_dir}"',
        "",
        "from sentence_transformers import CrossEncoder",
        "model = CrossEncoder(model_dir)",
        f"print(model.predict({pair}))  # sigmoid of the logit",
        "",
        "from FlagEmbedding import FlagReranker",
        "reranker = FlagReranker(model_dir)",
        f"print(reranker.compute_score({pair}))  # the logit; normalize=True: its sigmoid",
        "```",
        "",
        f"Queries and passages carry the instructions they were trained with; a pair keeps {cfg['query_max_len']} + "
        f"{cfg['passage_max_len']} tokens.",
    ]


def _lora_note(cfg: dict[str, Any]) -> str:
    note = (f"Trained with LoRA adapters (rank {cfg['lora_rank']}, alpha {cfg['lora_alpha']}, on "
            f"{', '.join(cfg['target_modules'])}{'; in full: ' + ', '.join(cfg['modules_to_save']) if cfg.get('modules_to_save') else ''}"
            f") on `{cfg['model_name_or_path']}`. This folder holds the adapters (peft loads them onto the base "
            "model; so do transformers and sentence-transformers when peft is installed)")
    if cfg.get("save_merged_lora_model"):
        note += f"; `{MERGED_SUBDIR}/` the model with them merged in, which loads without peft."
    else:
        note += "."
    if cfg.get("additional_special_tokens"):
        note += (f" Tokens were added ({', '.join(cfg['additional_special_tokens'])}): to load the adapters, grow the "
                 "base model's embeddings first (`model.resize_token_embeddings(len(tokenizer))`, then "
                 "`PeftModel.from_pretrained(model, path)`)" + (f", or load `{MERGED_SUBDIR}/`." if
                                                                cfg.get("save_merged_lora_model") else "."))
    return note


def model_card(model_dir: str, cfg: dict[str, Any], data: dict[str, int] | None = None,
               evals: dict[str, dict[str, Any]] | None = None) -> str:
    """The card's text. ``data``: training file -> usable rows; ``evals``: column name (``zero-shot``,
    ``best``, ``final``...) -> that measurement's ``step`` and metrics (``ndcg@10``...)."""
    cfg = strip_credentials(cfg)
    base = cfg["model_name_or_path"]
    rerank = cfg.get("task") == "reranker"
    kind = "an LLM reranker" if cfg.get("model_type") == "decoder" else "a cross-encoder"
    what = ("A reranker ({kind}) fine-tuned from `{base}` with bge-ray {v}: cross-entropy over each query's "
            "group of one positive and its negatives, scored as query-passage pairs" if rerank else
            "A text embedding model fine-tuned from `{base}` with bge-ray {v}: contrastive learning (InfoNCE) on "
            "query / positive / negative groups").format(base=base, v=__version__, kind=kind)
    lines = ["---", "library_name: sentence-transformers",
             f"pipeline_tag: {'text-ranking' if rerank else 'sentence-similarity'}",
             "tags: [sentence-transformers, " + ("cross-encoder, reranker" if rerank else
                                                "feature-extraction, sentence-similarity") + ", bge-ray]",
             f"base_model: {base}", "---", "", f"# {os.path.basename(os.path.normpath(model_dir))}", "",
             f"{what}, on Ray Train with DeepSpeed.", "", "## Training data", ""]
    if data:
        lines += ["| file | rows |", "|---|---|", *(f"| `{strip_credentials(f)}` | {n:,} |" for f, n in sorted(data.items()))]
    else:
        lines += [", ".join(f"`{p}`" for p in cfg.get("train_data") or [])]
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    keys = [k for k in HYPERPARAMETERS if not (rerank and k in EMBEDDER_ONLY)] + (list(RERANKER_ONLY) if rerank else [])
    lines += [f"| `{k}` | {cfg[k]!r} |" for k in keys if k in cfg and cfg[k] is not None]
    lines += ["", "## Evaluation", ""]
    if cfg.get("eval_data"):
        lines += [f"On `{cfg['eval_data']}` ({cfg.get('eval_split', 'test')} split):", ""]
    lines += _eval_table(evals or {}, cfg.get("metric_for_best_model", "ndcg@10"))
    if cfg.get("use_mrl"):
        dims = cfg["mrl_dims"]
        lines += ["", "## Matryoshka", "", f"Trained with the loss at dimensions {', '.join(map(str, dims))} "
                  f"({'weighted ' + str(cfg['mrl_weights']) if cfg.get('mrl_weights') else 'averaged'}): keep the "
                  f"first d values of an embedding (and normalise again) for smaller vectors, e.g. "
                  f"`SentenceTransformer(path, truncate_dim={min(dims)})`; `bge-ray eval --truncate_dim "
                  f"{' '.join(map(str, dims))}` scores each."]
    if cfg.get("unified_finetuning"):
        lines += ["", "## BGE-M3", "", "Trained with unified fine-tuning: dense, sparse (lexical) and ColBERT "
                  "(multi-vector) outputs; `colbert_linear.pt` and `sparse_linear.pt` hold the heads. Load all three "
                  "with FlagEmbedding's `BGEM3FlagModel(path, pooling_method=\"" + cfg["sentence_pooling_method"]
                  + "\"" + (f", colbert_dim={cfg['colbert_dim']}" if cfg.get("colbert_dim", -1) > 0 else "")
                  + ")`; transformers and sentence-transformers load the dense model."]
    if cfg.get("use_lora"):
        lines += ["", "## LoRA", "", _lora_note(cfg)]
    lines += ["", "## Usage", "", *(_reranker_usage if rerank else _usage)(model_dir, cfg), "",
              "## Framework versions", "",
              *(f"- {v}" for v in _versions()), ""]
    return "\n".join(lines)


def write_model_card(out_dir: str, cfg: dict[str, Any], data: dict[str, int] | None = None,
                     evals: dict[str, dict[str, Any] | None] | None = None, model_dir: str | None = None) -> str:
    """``README.md`` in ``out_dir``; its loading snippets name ``model_dir`` (default: ``out_dir``, where
    the model lies; a checkpoint's export gives where it will lie in storage)."""
    path = os.path.join(out_dir, CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(model_dir or out_dir, cfg, data, {k: v for k, v in (evals or {}).items() if v}))
    return path
