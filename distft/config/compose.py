"""Where the config groups live and how to compose them outside `hydra.main` (compare arms, the planner, tests,
benchmarks): one home, so every entry point composes exactly what `python -m distft.train` would."""

from contextlib import contextmanager
from pathlib import Path

from distft.config.schema import MethodConfig, StrategyConfig, register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # package data: found from any directory, in a wheel too


@contextmanager
def hydra_context():
    """Inside `hydra.main` Hydra is initialised with conf/ already; elsewhere start it here for the duration."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


def compose(overrides: list[str]):
    """The training config for these command-line overrides (the typed schema is registered first)."""
    from hydra import compose as hydra_compose

    register_configs()
    with hydra_context():
        return hydra_compose("train", overrides=list(overrides))


def preset(group: str, name: str):
    """One config-group preset (conf/<group>/<name>.yaml) merged over its schema, for trying alternatives."""
    from omegaconf import OmegaConf

    schema = {"strategy": StrategyConfig, "method": MethodConfig}[group]
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
