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
        "hub": result.get("hub"),  # run.push_to_hub: {"repo", "url"} or {"repo", "skipped", "push_later"}
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
        "stopped_phase": result.get("stopped_phase"),  # a stopped run: training, loading, evaluation or export
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


def outcome_table(summary: dict) -> str:
    """What the console shows when a run ends: the training in one line, evaluation before/after with the number of
    examples behind each figure, where the export and summary.json are (summary.json has everything)."""
    from distft.progress import duration

    losses = f", train loss {summary['train_loss_first']:.4f} → {summary['train_loss_last']:.4f}" \
        if summary.get("train_loss_last") is not None else ""
    speed = f", {summary['tokens_per_second']:,.0f} tokens/s" if summary.get("tokens_per_second") else ""
    lines = [f"distft: {summary['status']} {summary['run_name']} in {duration(summary['wall_seconds'])}: "
             f"{summary['steps']} steps{losses}{speed}"]
    before, after = summary.get("eval_start") or {}, summary.get("eval") or {}
    if before or after:
        lines.append(f"  {'':<20}{'before':>10}{'after':>10}")
        if "eval_loss" in before or "eval_loss" in after:
            n = after.get("eval_loss_examples", before.get("eval_loss_examples"))
            lines.append(f"  {'eval loss':<20}{_cell(before.get('eval_loss'), '.4f')}"
                         f"{_cell(after.get('eval_loss'), '.4f')}   ({n} examples)")
        if "num_examples" in before or "num_examples" in after:
            lines += _metric_lines(before, after)
    check = summary.get("export_check") or {}
    if summary.get("export_dir"):
        if check.get("ok") and check.get("check") == "tensors":
            verified = f" (checked: {check['tensors']} tensors read back, identical to the trained ones)"
        elif check.get("ok"):
            verified = f" (reloaded and checked: max |logit diff| {check['max_abs_logit_diff']:.2g})"
        else:
            verified = ""
        lines.append(f"  export: {summary['export_dir']}{verified}")
    hub = summary.get("hub") or {}
    if hub.get("url"):
        lines.append(f"  pushed to the Hub: {hub['url']}")
    elif hub:
        lines.append(f"  not pushed to {hub['repo']}: {hub['skipped']} ({hub['push_later']})")
    lines.append(f"  summary: {summary['run_dir']}/summary.json")
    return "\n".join(lines)


# Generation metrics as the console names them, headline first within each task (distft.eval.tasks).
METRIC_LABELS = {
    "gsm8k_format_rate": "GSM8K format rate", "gsm8k_accuracy": "GSM8K accuracy",
    "gsm8k_strict_match": "lm-eval strict", "gsm8k_flexible_extract": "lm-eval flexible",
    "sql_exact_match": "SQL exact match", "sql_execution_match": "SQL execution",
    "viggo_exact_match": "ViGGO exact match", "viggo_function_match": "ViGGO function",
}


def _metric_lines(before: dict, after: dict) -> list[str]:
    """One line per generation metric either evaluation has; the headline metric with its 95% interval."""
    from distft.eval.gsm8k import wilson_interval

    n = after.get("num_examples", before.get("num_examples"))
    headline = after.get("metric") or before.get("metric") or "gsm8k_accuracy"
    lines = []
    for key, label in METRIC_LABELS.items():
        if key not in before and key not in after:
            continue
        note = f"({n} examples"
        correct = after.get("correct", after.get("gsm8k_correct"))
        if key == headline and correct is not None:
            low, high = wilson_interval(correct, after["num_examples"])
            note += f"; after: 95% CI {low:.1%}–{high:.1%}"
        lines.append(f"  {label:<20}{_cell(before.get(key), '.1%')}{_cell(after.get(key), '.1%')}   {note})")
    return lines


def _cell(value: float | None, spec: str) -> str:
    return f"{'–' if value is None else format(value, spec):>10}"
