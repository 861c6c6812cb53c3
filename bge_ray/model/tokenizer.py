"""The tokenizer of a model, loaded once per process, as FlagEmbedding's runner for its kind loads it."""

from __future__ import annotations

import functools
from typing import Any

from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_decoder_only(config: Any) -> bool:
    """Whether a transformers config is a decoder-only (LLM) model's: a causal LM type without a
    masked-LM class (Llama, Mistral, Qwen, Gemma, GPT-2; not BERT, XLM-RoBERTa, ModernBERT, nor an
    encoder-decoder such as T5), or a remote-code model whose architectures are causal LMs."""
    if getattr(config, "is_encoder_decoder", False) or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def reads_as_decoder(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> bool:
    """Whether ``name_or_path`` is a decoder-only model (False where its config cannot be read: a
    tokenizer-only folder)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    return is_decoder_only(config)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False,
                   use_fast: bool = True, special_tokens: tuple[str, ...] = ()) -> Any:
    """A model's tokenizer (the fast one unless ``use_fast`` is False), loaded once per process.

    A decoder-only model's is loaded as FlagEmbedding's decoder runners load it: EOS appended to every
    text (``add_eos_token``, kept by truncation, so ``last_token`` pools it), padding on the left, and
    the unknown token (else EOS) as padding where it has none. ``special_tokens`` are added as
    ``additional_special_tokens`` (the model's embeddings must grow to ``len(tokenizer)``).
    """
    decoder = reads_as_decoder(name_or_path, cache_dir, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                        use_fast=use_fast, **({"add_eos_token": True} if decoder else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if decoder and tok.unk_token is not None else tok.eos_token
    if decoder:
        tok.padding_side = "left"
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tok
