"""Preflight (`preflight=true`): one real step, a checkpoint save and its reload on the real cluster, then
preflight.json with the measured peaks next to the plan's prediction. `reload_check` is the workers' half,
`write_preflight` the driver's."""

import json
from pathlib import Path

import torch

from distft import dist
from distft.checkpoint import load_checkpoint
from distft.plan.memory import GiB


def reload_check(strategy, *, checkpoint, rank: int, world: int, device: torch.device) -> dict:
    """Reload the checkpoint step 1 just saved (`checkpoint`: (ray.train.Checkpoint, location) as the run's
    storage holds it, read as a restart would) into the strategy, and check the trainable weights survived the
    round trip (collective)."""
    checkpoint, location = checkpoint
    dist.barrier()  # every rank has returned from its report: its files are in storage
    before = _trainable_checksum(strategy, device)
    with torch.no_grad():  # a reload must overwrite the weights: disturb them first
        for t in strategy.local_trainable_tensors():
            t.add_(1.0)
    with checkpoint.as_directory() as ckpt_dir:  # downloaded when storage is a URI
        load_checkpoint(Path(ckpt_dir), strategy=strategy, rank=rank, world_size=world)
    after = _trainable_checksum(strategy, device)
    return {"checkpoint": location, "reloaded": True,
            "reload_checksum": {"saved": before, "reloaded": after, "equal": before == after}}


def _trainable_checksum(strategy, device: torch.device) -> float:
    """Sum of squares of every rank's local trainable weights (shards under ZeRO-3/FSDP), summed over ranks."""
    total = 0.0
    for t in strategy.local_trainable_tensors():
        total += float(t.detach().double().pow(2).sum())
    return dist.all_reduce(total, device)


def write_preflight(run_dir: Path, *, summary: dict, plan: dict | None, location: str | None = None) -> dict:
    """Write `run_dir/preflight.json` and print a per-worker table of predicted vs measured peak memory.
    `location`: where the run lives when run_dir is a staging copy of a URI."""
    result_path = run_dir / "train_result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    measured = result.get("peak_memory_bytes_per_worker") or []
    # Compare with the phases this preflight ran (no export; eval only with eval.at_start).
    by_phase = result.get("peak_memory_bytes_by_phase")
    ran = tuple(by_phase) if by_phase else ("load", "train", "save")
    predicted = [max(plan["phases"][p]["rank0" if rank == 0 else "other"] for p in ran if p in plan["phases"])
                 for rank in range(len(measured))] if plan else []
    report = {
        "status": summary["status"],
        "error": summary["error"],
        "run_dir": location or str(run_dir),
        "measured_as": plan["measured_as"] if plan else None,
        "measured_peak_bytes_per_worker": measured,
        "predicted_peak_bytes_per_worker": predicted,
        "ratio_measured_to_predicted": [m / p for m, p in zip(measured, predicted, strict=True)] if predicted else None,
        # per phase: what each worker measured and what the plan predicted for it (reload has no prediction)
        "phases": _phases(by_phase, plan),
        "predicted_full_run_peak_bytes": plan["peak_bytes"] if plan else None,
        "predicted_fits": plan["fits"] if plan else None,
        "plan": plan,
        "checkpoint": result.get("checkpoint"),
        "reloaded": result.get("reloaded", False),
        "reload_checksum": result.get("reload_checksum"),
        "train_loss_first_step": result.get("train_loss_first_step"),
    }
    (run_dir / "preflight.json").write_text(json.dumps(report, indent=2))
    print(render_preflight(report))
    return report


def _phases(measured: dict | None, plan: dict | None) -> dict | None:
    if not measured:
        return None
    predicted = (plan or {}).get("phases", {})
    return {phase: {"measured": values,
                    "predicted": [predicted[phase]["rank0" if rank == 0 else "other"] for rank in range(len(values))]
                    if phase in predicted else None}
            for phase, values in measured.items()}


def render_preflight(report: dict) -> str:
    lines = [f"preflight: {report['status']}" + (f" ({report['error']})" if report["error"] else ""),
             "worker   predicted (phases run) GiB   measured GiB   measured/predicted"]
    for rank, m in enumerate(report["measured_peak_bytes_per_worker"]):
        p = report["predicted_peak_bytes_per_worker"][rank] if report["predicted_peak_bytes_per_worker"] else None
        ratio = f"{m / p:.2f}" if p else "–"
        lines.append(f"{rank:>6}   {p / GiB if p else float('nan'):>26.2f}   {m / GiB:>12.2f}   {ratio:>18}")
    for phase, row in (report.get("phases") or {}).items():
        predicted = ", ".join(f"{p / GiB:.2f}" for p in row["predicted"]) if row["predicted"] else "–"
        lines.append(f"  {phase:<7} measured {', '.join(f'{m / GiB:.2f}' for m in row['measured'])} GiB"
                     f"   predicted {predicted} GiB")
    if report["predicted_full_run_peak_bytes"]:
        lines.append(f"full run (with eval/export) predicted peak: {report['predicted_full_run_peak_bytes'] / GiB:.2f}"
                     f" GiB per worker; fits: {report['predicted_fits']}")
    check = report.get("reload_checksum") or {}
    lines.append(f"checkpoint {report['checkpoint']}: saved and reloaded "
                 f"({'weights identical' if check.get('equal') else 'WEIGHTS DIFFER after reload'})")
    lines.append(f"written: {report['run_dir']}/preflight.json")
    return "\n".join(lines)
