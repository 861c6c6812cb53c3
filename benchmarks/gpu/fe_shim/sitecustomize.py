"""Lets FlagEmbedding 1.4.2 be imported under transformers 5 (on ``PYTHONPATH`` for its runs only).

FlagEmbedding's package ``__init__`` imports every inference class, among them the MiniCPM layer-wise
reranker, which imports ``transformers.modeling_attn_mask_utils``: transformers 5 removed that module,
so even the embedder fine-tune runner, which never uses it, fails to import. Where the module is
missing, a placeholder is registered under its name; calling anything from it raises, so nothing runs
on fake code.
"""

import importlib.util
import sys
import types

_MISSING = "transformers.modeling_attn_mask_utils"


def _placeholder() -> types.ModuleType:
    module = types.ModuleType(_MISSING)

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise NotImplementedError(f"{_MISSING}.{name} does not exist in this transformers")

        return unavailable

    module.__getattr__ = __getattr__
    return module


try:
    _found = importlib.util.find_spec(_MISSING) is not None
except ImportError:  # transformers itself missing: nothing to do
    _found = True
if not _found:
    sys.modules[_MISSING] = _placeholder()
