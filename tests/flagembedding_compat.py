"""Import FlagEmbedding 1.4.2 under transformers 5 for the compatibility test.

FlagEmbedding's package __init__ imports every model class, and one of them (a MiniCPM reranker
we never use) imports ``transformers.modeling_attn_mask_utils``, which transformers 5 removed.
Where that module is missing we register an empty placeholder module under that name before the
import; anything that really used it would fail with AttributeError, so nothing runs on fake code.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_MISSING = "transformers.modeling_attn_mask_utils"


def import_flag_model():
    # registered once per process: find_spec refuses a module already in sys.modules without a __spec__
    if _MISSING not in sys.modules and importlib.util.find_spec(_MISSING) is None:
        placeholder = types.ModuleType(_MISSING)
        placeholder.__doc__ = "placeholder registered by tests/flagembedding_compat.py"

        def __getattr__(name):  # names are only imported, never called, by the code we use
            if name.startswith("__"):  # a module's own attributes (__file__...): the placeholder has none
                raise AttributeError(name)

            def unavailable(*args, **kwargs):
                raise NotImplementedError(f"{_MISSING}.{name} does not exist in this transformers")

            return unavailable

        placeholder.__getattr__ = __getattr__
        sys.modules[_MISSING] = placeholder
    from FlagEmbedding import FlagModel

    return FlagModel


def argument_classes() -> list[type]:
    """The argument dataclasses of FlagEmbedding's embedder runners (encoder-only base and M3,
    decoder-only base and ICL), as their ``HfArgumentParser`` reads a command."""
    import_flag_model()
    from FlagEmbedding.finetune.embedder.decoder_only.base import DecoderOnlyEmbedderModelArguments
    from FlagEmbedding.finetune.embedder.decoder_only.icl import (
        DecoderOnlyEmbedderICLDataArguments,
        DecoderOnlyEmbedderICLModelArguments,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderTrainingArguments,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )

    return [EncoderOnlyEmbedderModelArguments, EncoderOnlyEmbedderDataArguments, EncoderOnlyEmbedderTrainingArguments,
            EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3TrainingArguments,
            DecoderOnlyEmbedderModelArguments, DecoderOnlyEmbedderICLModelArguments, DecoderOnlyEmbedderICLDataArguments]
