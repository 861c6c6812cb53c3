"""The errors bge-ray raises on purpose. Each message says what is wrong and what to change; the
CLI prints ``ConfigError`` and ``DataValidationError`` as one line and exits with status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what to change."""


class DataValidationError(ValueError):
    """Data that cannot be used; the message names the file and line."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from."""
