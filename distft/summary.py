"""summary.json: the contract other tools (report, plan, CI) read. Keys are stable; values are measured."""

import json
from pathlib import Path

from omegaconf import DictConfig

from distft.storage import RunStorage
from distft.tracking import read_metrics


def build_summary(cfg: DictConfig, run_dir: Path, *, status: str, error: str | None, wall_seconds: float,
                  plan: dict | None = None) -> dict:
    """The run's summary from its config, train_result.json and metrics.jsonl in `run_dir`."""
    result_path = run_dir / "train_result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() and status == "completed" else {}
    if result.get("stopped"):  # a stop request (SIGTERM, preemption) ended the run after a checkpoint
        status, error = "stopped", result["stopped"]
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "status": status,
        "error": error,
        "run_name": cfg.run.name,
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "method": cfg.method.name,
        "strategy": cfg.strategy.name,
        "hardware": cfg.hardware.name,
        "num_workers": cfg.scaling.num_workers,
        "steps": result.get("steps", rows[-1]["step"] if rows else 0),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "eval": result.get("eval"),
        "eval_start": result.get("eval_start"),
        "tokens_per_second": result.get("tokens_per_second"),
        "peak_memory_bytes": result.get("peak_memory_bytes"),
        "trainable_params": result.get("trainable_params"),
        "total_params": result.get("total_params"),
        "wall_seconds": wall_seconds,
        "export_dir": result.get("export_dir"),
        "export_check": result.get("export_check"),
        "lr": result.get("lr"),
        "grad_accum": result.get("grad_accum"),
        "data": result.get("data"),
        "resumed_from": result.get("resumed_from"),
        # The planner's prediction next to the measured per-worker peaks (python -m distft.plan explains it).
        "plan": None if plan is None else {
            **plan, "measured_peak_bytes_per_worker": result.get("peak_memory_bytes_per_worker"),
            "measured_phases": result.get("peak_memory_bytes_by_phase")},  # {phase: [per worker]}, next to "phases"
        "worker_nodes": result.get("worker_nodes"),
        "resume_warning": result.get("resume_warning"),
    }


def write_summary(storage: RunStorage, summary: dict) -> None:
    """summary.json in the run directory (and at the run's storage location for a URI)."""
    if storage.remote:
        summary["run_dir"] = storage.uri
        if summary["export_dir"]:
            summary["export_dir"] = storage.location("export")
    storage.write_text("summary.json", json.dumps(summary, indent=2))


def write_failed_summary(storage: RunStorage, error: str) -> None:
    """A run refused before it started (a sweep job with a bad config): the report shows it failed, and why.
    A completed run's summary is never overwritten (its refusal is "already completed")."""
    if storage.completed():
        return
    summary = {"status": "failed", "error": error, "error_kind": "user", "run_name": storage.name,
               "run_dir": storage.uri}
    storage.write_text("summary.json", json.dumps(summary, indent=2))
