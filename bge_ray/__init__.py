"""bge-ray: fine-tune BGE-style text embedders on Ray (Ray Data + Ray Train + Ray Tune + DeepSpeed)."""

__version__ = "0.1.0"

from bge_ray.config import ConfigError, FinetuneConfig, load_config  # noqa: E402


def finetune(config, **kwargs):  # noqa: ANN001, ANN003, ANN201  (thin door; documented in bge_ray.api.finetune)
    """Fine-tune an embedder; see :func:`bge_ray.api.finetune`."""
    from bge_ray.api import finetune as _finetune

    return _finetune(config, **kwargs)


def evaluate(models, data, **kwargs):  # noqa: ANN001, ANN003, ANN201  (thin door)
    """Evaluate models on a retrieval data set; see :func:`bge_ray.evaluation.evaluate`."""
    from bge_ray.evaluation import evaluate as _evaluate

    return _evaluate(models, data, **kwargs)


def tune(config, overrides=None):  # noqa: ANN001, ANN201  (thin door)
    """Hyperparameter sweep on Ray Tune; see :func:`bge_ray.sweep.tune`."""
    from bge_ray.sweep import tune as _tune

    return _tune(config, overrides)


def mine(config=None, **kwargs):  # noqa: ANN001, ANN003, ANN201  (thin door)
    """Mine hard negatives; see :func:`bge_ray.mining.mine`."""
    from bge_ray.mining import mine as _mine

    return _mine(config, **kwargs)


def score(config=None, **kwargs):  # noqa: ANN001, ANN003, ANN201  (thin door)
    """Add teacher scores for distillation; see :func:`bge_ray.mining.score`."""
    from bge_ray.mining import score as _score

    return _score(config, **kwargs)


__all__ = ["ConfigError", "FinetuneConfig", "evaluate", "finetune", "load_config", "mine", "score", "tune",
           "__version__"]
