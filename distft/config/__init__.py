"""Typed configs (schema), ConfigStore registration and cross-field validation."""

from distft.config.schema import TrainConfig, register_configs
from distft.config.validate import validate_cluster, validate_config

__all__ = ["TrainConfig", "register_configs", "validate_cluster", "validate_config"]
