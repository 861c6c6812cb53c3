"""bge-ray: fine-tune BGE-style text embedders and rerankers on Ray (Ray Data + Ray Train + Ray Tune + DeepSpeed).

The Python API; the ``bge-ray`` command and the ``jobs/`` scripts are thin doors onto these. The
functions that run on a cluster are loaded on first use (``bge_ray.finetune`` imports torch, Ray
Train and DeepSpeed; ``import bge_ray`` alone does not).
"""

from __future__ import annotations

import importlib
from typing import Any

from bge_ray.config import ConfigError, FinetuneConfig, RerankerConfig, load_config
from bge_ray.errors import CheckpointError, DataValidationError
from bge_ray.version import __version__

_RUNNERS = {"finetune": "bge_ray.train.launch", "evaluate": "bge_ray.retrieval.evaluate", "mine": "bge_ray.tools.mine",
            "score": "bge_ray.tools.score", "tune": "bge_ray.sweep.run"}


def __getattr__(name: str) -> Any:
    if name in _RUNNERS:
        return getattr(importlib.import_module(_RUNNERS[name]), name)
    raise AttributeError(f"module 'bge_ray' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "DataValidationError", "FinetuneConfig", "RerankerConfig", "__version__",
           "evaluate", "finetune", "load_config", "mine", "score", "tune"]
