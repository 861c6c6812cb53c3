"""The tokenizer of a model, loaded once per process."""

from __future__ import annotations

import functools
from typing import Any

from transformers import AutoTokenizer


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False,
                   use_fast: bool = True) -> Any:
    """A model's tokenizer (the fast one unless ``use_fast`` is False), loaded once per process;
    decoders without a pad token pad with EOS."""
    tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                        use_fast=use_fast)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
