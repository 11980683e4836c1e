"""`+experiment=lora_sweep`: the rank x learning-rate grid Hydra's sweeper expands, and every job a valid run."""

import pytest
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from distft.config import hydra_context, validate_config
from distft.config.schema import register_configs
from tests.conftest import compose_cfg


def jobs(cli: list[str]) -> list[list[str]]:
    """The jobs `python -m distft.train -m +experiment=lora_sweep CLI...` launches, as Hydra's BasicSweeper builds
    them: the preset's hydra.sweeper.params first, then the command line (the later of two sweeps of a key wins)."""
    register_configs()
    with hydra_context():
        cfg = compose("train", overrides=["+experiment=lora_sweep"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")  # through the Ray sweep launcher
    overrides = OverridesParser.create().parse_overrides([*params, "+experiment=lora_sweep", *cli])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def test_the_preset_sweeps_rank_by_learning_rate_around_ten_times_full_fine_tuning():
    grid = jobs([])
    assert len(grid) == 9
    ranks = {o.split("=")[1] for job in grid for o in job if o.startswith("method.lora_r=")}
    lrs = {float(o.split("=")[1]) for job in grid for o in job if o.startswith("trainer.lr=")}
    assert ranks == {"8", "64", "256"}
    full_lr = compose_cfg(["+experiment=gsm8k_full"]).method.default_lr
    assert sorted(lrs) == [5 * full_lr, 10 * full_lr, 20 * full_lr]


@pytest.mark.parametrize("job", jobs(["model=tiny_llama", "hardware=cpu", "method.lora_r=8,64",
                                      "trainer.lr=1e-3,3e-3"]), ids=str)
def test_a_two_by_two_cpu_grid_from_the_command_line_gives_four_valid_runs(job, data_dir):
    cfg = compose_cfg([*job, f"data.path={data_dir}"])
    validate_config(cfg)
    assert cfg.method.name == "lora" and cfg.method.lora_alpha == 32
    assert cfg.method.lora_r in (8, 64) and cfg.trainer.lr in (1e-3, 3e-3)


def test_a_sweep_job_keeps_a_storage_uri_and_gets_a_name_unique_across_sweeps(tmp_path):
    from distft.train import sweep_group, sweep_job_location

    job = tmp_path / "multirun" / "2026-12-03" / "17-30-00" / "2-tiny_llama-lora-ddp"
    assert sweep_job_location("s3://bucket/runs", job) == ("s3://bucket/runs",
                                                            "2026-12-03_17-30-00-2-tiny_llama-lora-ddp")
    assert sweep_job_location("runs", job) == (str(job.parent), "2-tiny_llama-lora-ddp")
    assert sweep_group(tmp_path / "my-sweep") == "my-sweep"
