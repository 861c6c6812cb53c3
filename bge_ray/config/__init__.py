"""Configs: typed fields with their help, parsing from YAML and the command line, validation, and
the DeepSpeed config a fine-tune derives from its config."""

from bge_ray.config.fields import knob
from bge_ray.config.finetune import FinetuneConfig, RerankerConfig
from bge_ray.config.parse import load_config, resolve_config
from bge_ray.errors import ConfigError

__all__ = ["ConfigError", "FinetuneConfig", "RerankerConfig", "knob", "load_config", "resolve_config"]
