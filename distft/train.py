"""`python -m distft.train +experiment=gsm8k_lora [overrides]`

The Hydra entry point: compose the config, then run it (`distft.launch.launch`) or, with `compare.enabled`, every
arm of a comparison (`distft.compare.run_compare`), and turn the outcome into an exit code: 0 completed, 1 failed,
2 a problem the user can fix (printed without a stack trace), 3 stopped on request (SIGTERM; rerun to resume).
"""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distft.command_line import command_line_problem
from distft.compare import run_compare
from distft.config import CONF_DIR, register_configs
from distft.errors import UserError
from distft.launch import launch
from distft.storage import RunStorage
from distft.summary import outcome_table, write_failed_summary

register_configs()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    multirun = _multirun_run_dir(cfg)
    try:
        if cfg.compare.enabled:
            from hydra.core.hydra_config import HydraConfig

            record = run_compare(cfg, list(HydraConfig.get().overrides.task))
            print(json.dumps({n: a["status"] for n, a in record["arms"].items()} | {"report": record.get("report")},
                             indent=2))
            if not multirun and any(a["status"] != "completed" for a in record["arms"].values()):
                sys.exit(1)
            return
        summary = launch(cfg)
    except UserError as e:
        print(f"\ndistft: error: {e}\n", file=sys.stderr)
        if multirun:  # the other jobs of the sweep go on; the report shows this one as failed, with the reason
            write_failed_summary(RunStorage(cfg.run.storage_path, cfg.run.name), str(e))
            return
        sys.exit(2)
    if summary.get("error_kind") == "user":  # a worker found it (summary.json has it too)
        print(f"\ndistft: error: {summary['error']}\n", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        return
    print(outcome_table(summary))
    if summary["status"] == "stopped":
        print(f"\ndistft: {stopped_message(summary)}\n", file=sys.stderr)
        sys.exit(3)
    if summary["status"] != "completed" and not multirun:
        sys.exit(1)


def stopped_message(summary: dict) -> str:
    steps, phase = summary["steps"], summary.get("stopped_phase") or "training"
    if not steps:
        return f"stopped ({summary['error']}) during {phase}, before the first step (nothing to save); rerun " \
            "the same command to start again"
    where = "after a checkpoint" if phase == "training" else f"during {phase}; the checkpoint of step {steps} is kept"
    return f"stopped ({summary['error']}) {where}; rerun the same command to resume"


def _multirun_run_dir(cfg: DictConfig) -> bool:
    """Under `-m`, each job's run directory is the one Hydra made for it (hydra.sweep.subdir is
    `<job number>-<run.name>/hydra`), so jobs of one sweep never share a run directory and all sit in the sweep dir;
    the sweep is one W&B group (unless logger.group is set) and each job its own job type."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    cfg.run.storage_path, cfg.run.name = sweep_job_location(cfg.run.storage_path,
                                                            Path(HydraConfig.get().runtime.output_dir).parent)
    if cfg.logger.group is None:
        cfg.logger.group = sweep_group(Path(HydraConfig.get().sweep.dir))
    return True


def sweep_job_location(storage_path: str, job_dir: Path) -> tuple[str, str]:
    """(run.storage_path, run.name) of one sweep job. Local storage: the job's own directory in the sweep dir. A
    storage URI (s3://, gs://) is kept as it is (never through pathlib, which would make it `s3:/...`), and the job
    is named after its sweep and number so that jobs of different sweeps never share a run."""
    if "://" in str(storage_path):
        return str(storage_path), f"{sweep_group(job_dir.parent)}-{job_dir.name}"
    return str(job_dir.parent), job_dir.name


def sweep_group(sweep_dir: Path) -> str:
    """A sweep's name: its directory, with the date above it for Hydra's default multirun/<date>/<time>."""
    parent = sweep_dir.parent.name
    return f"{parent}_{sweep_dir.name}" if parent[:2].isdigit() else sweep_dir.name


def cli() -> None:
    """`python -m distft.train` / `distft-train`: the command line checked first (distft.command_line), then
    Hydra's main."""
    problem, _ = command_line_problem(sys.argv[1:])
    if problem:
        print(f"\ndistft: error: {problem}\n", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
