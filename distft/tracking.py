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


class RunTracker:
    """Rank 0's record of a run: metrics.jsonl always, W&B when configured, and a progress bar. The other ranks
    get one with nothing attached, so the loop calls it on every rank without asking which one it is."""

    def __init__(self, metrics: MetricsFile | None = None, wandb: "WandbLogger | None" = None, *,
                 log_every: int = 1, progress_bar: bool = False):
        self.metrics, self.wandb, self.log_every = metrics, wandb, log_every
        self.progress_bar = progress_bar and metrics is not None
        self.bar = None

    def start(self, total: int, initial: int) -> None:
        if self.progress_bar:
            from tqdm import tqdm

            # Ray forwards worker output line by line, so redraw rarely rather than in place.
            self.bar = tqdm(total=total, initial=initial, desc="train", mininterval=10, ncols=100)

    def log_step(self, row: dict, *, last: bool) -> None:
        """One optimizer step's row; written every `log_every` steps and at the last one."""
        if self.metrics is not None and (row["step"] % self.log_every == 0 or last):
            self.metrics.log(row)
            if self.wandb:
                self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")

    def log_eval(self, result: dict, *, step: int, prefix: str = "eval") -> None:
        """An evaluation's numbers as W&B history `<prefix>/<key>` at `step` (0 for the base model's)."""
        if self.wandb:
            numbers = {f"{prefix}/{k}": v for k, v in result.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb.log(numbers, step=step)

    def log_samples(self, rows: list[dict], *, key: str = "eval/samples") -> None:
        """Every scored question's output as a W&B table."""
        if self.wandb and rows:
            self.wandb.table(key, rows)

    def log_artifact(self, path: Path, *, name: str, kind: str) -> None:
        if self.wandb:
            self.wandb.artifact(path, name=name, kind=kind)

    def stop(self) -> None:
        if self.bar:
            self.bar.close()

    def finish(self, summary: dict) -> None:
        """Numbers for W&B's run summary, then close the W&B run."""
        if self.wandb:
            self.wandb.summary(summary)
            self.wandb.finish()


class WandbLogger:
    """Thin wrapper that turns every W&B failure into a warning: tracking must never stop training."""

    def __init__(self, *, project: str, entity: str | None, group: str | None, tags: list[str], mode: str | None,
                 run_name: str, run_dir: Path, config: dict, resume: bool, job_type: str | None = None):
        self.run = None
        try:
            import wandb

            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                job_type=job_type,
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

    def table(self, key: str, rows: list[dict]) -> None:
        if self.run is None:
            return
        try:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        except Exception as e:  # noqa: BLE001
            log.warning("W&B table failed: %s", e)

    def artifact(self, path: Path, *, name: str, kind: str) -> None:
        """A directory as a W&B artifact by reference (its files stay where they are: a 7B export is not uploaded
        again), for storage URIs and local paths alike."""
        if self.run is None:
            return
        try:
            import re

            import wandb

            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", name), type=kind)
            artifact.add_reference(str(path) if "://" in str(path) else Path(path).resolve().as_uri())
            self.run.log_artifact(artifact)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B artifact failed: %s", e)

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
