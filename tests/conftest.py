"""Shared test helpers: Hydra compose, the GSM8K location, and a local Ray cluster for the slow tier."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distft.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))

register_configs()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR} (set GSM8K_DIR)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (more logical CPUs than cores is fine for tests)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "distft.train.quiet_local_workers"})
    yield
    ray.shutdown()
