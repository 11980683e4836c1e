"""Config-group presets (conf/<group>/<name>.yaml) merged over their schema, for trying alternatives in-process."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def preset(group: str, name: str):
    from omegaconf import OmegaConf

    from distft.config.schema import MethodConfig, StrategyConfig

    schema = {"strategy": StrategyConfig, "method": MethodConfig}[group]
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
