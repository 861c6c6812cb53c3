"""bge-ray: fine-tune BGE-style text embedders on Ray (Ray Data + Ray Train + DeepSpeed)."""

__version__ = "0.1.0"

from bge_ray.config import ConfigError, FinetuneConfig, load_config  # noqa: E402


def finetune(config):  # noqa: ANN001, ANN201  (thin door; documented in bge_ray.api.finetune)
    """Fine-tune an embedder; see :func:`bge_ray.api.finetune`."""
    from bge_ray.api import finetune as _finetune

    return _finetune(config)


def evaluate(models, data, **kwargs):  # noqa: ANN001, ANN003, ANN201  (thin door)
    """Evaluate models on a retrieval data set; see :func:`bge_ray.evaluation.evaluate`."""
    from bge_ray.evaluation import evaluate as _evaluate

    return _evaluate(models, data, **kwargs)


__all__ = ["ConfigError", "FinetuneConfig", "evaluate", "finetune", "load_config", "__version__"]
