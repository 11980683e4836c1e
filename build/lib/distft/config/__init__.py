"""Typed configs (schema), ConfigStore registration, composition and cross-field validation."""

from distft.config.compose import CONF_DIR, compose, hydra_context, preset
from distft.config.schema import TrainConfig, register_configs
from distft.config.validate import validate_cluster, validate_config

__all__ = ["CONF_DIR", "TrainConfig", "compose", "hydra_context", "preset", "register_configs",
           "validate_cluster", "validate_config"]
