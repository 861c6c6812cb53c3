"""Ray Train's worker entry point: the recipe of the config's task."""

from __future__ import annotations

from typing import Any

from bge_ray.train.recipe import EmbedderRecipe
from bge_ray.train.reranker import RerankerRecipe


def train_loop(loop_config: dict[str, Any]) -> None:
    """``loop_config`` holds ``cfg`` (a dict), ``plan`` (a dict), ``ds_config``, ``router`` (a BatchRouter
    actor), ``datasets`` (dicts of :class:`bge_ray.data.plan.DataSet`), ``vset`` (an object ref, or None)
    and ``start`` (a checkpoint of another run to continue, or None)."""
    recipe = (RerankerRecipe if loop_config["cfg"].get("task") == "reranker" else EmbedderRecipe)(loop_config)
    recipe.setup()
    recipe.train()
