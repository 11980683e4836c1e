"""Metrics: the local metrics.jsonl that every run writes, and optional Weights & Biases on rank 0."""

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsFile:
    """Append-only JSONL, one object per logged step. On resume, rows after the resumed step are dropped so that
    the file holds each step once."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(path) if path.exists() else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a crash
                continue
    return rows


class WandbLogger:
    """Thin wrapper that turns every W&B failure into a warning: tracking must never stop training."""

    def __init__(self, *, project: str, entity: str | None, group: str | None, tags: list[str], mode: str | None,
                 run_name: str, run_dir: Path, config: dict, resume: bool):
        self.run = None
        try:
            import wandb

            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                tags=list(tags),
                mode=mode,
                name=run_name,
                id=_wandb_id(run_dir),
                resume="allow" if resume else None,
                dir=str(run_dir),
                config=config,
            )
        except Exception as e:  # noqa: BLE001 - any failure (no login, no network) must not kill training
            log.warning("W&B disabled: wandb.init failed: %s", e)

    def log(self, row: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B log failed, disabling W&B: %s", e)
            self.run = None

    def summary(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B summary failed: %s", e)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B finish failed: %s", e)


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
