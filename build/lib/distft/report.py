"""`python -m distft.report RUN_DIR... | SWEEP_DIR | COMPARE_DIR [--out DIR]`: side-by-side report of runs.

Writes report.md (one Markdown table row per arm) and PNG plots (training loss curves overlaid, GSM8K accuracy vs
peak memory, tokens/s), and logs the same table and plots to W&B when the runs used `logger=wandb`.

What counts as an arm: in a compare directory (compare.json), each named arm; elsewhere, runs that share method,
strategy and model — so in a sweep over `trainer.lr` the arm's best run (highest GSM8K accuracy, then lowest eval
loss) is reported with the learning rates tried. Runs that failed or never wrote a summary are rows marked `failed`
or `missing`, never dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distft.eval import wilson_interval
from distft.tracking import read_metrics

log = logging.getLogger(__name__)

ARM_FIELDS = ("method", "strategy", "model")  # runs that agree on these are one arm (sweeps vary the rest)
PLOTS = ("loss_curves.png", "accuracy_vs_memory.png", "tokens_per_second.png")


@dataclass
class Run:
    """One run directory as the report sees it."""

    run_dir: Path
    status: str  # completed | failed | missing
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def eval(self) -> dict:
        """The run's final eval; GSM8K numbers from `distft.eval` (eval_gsm8k.json) replace the training-time ones
        when present (usually more examples)."""
        out = dict(self.summary.get("eval") or {})
        final = self.run_dir / "eval_gsm8k.json"
        if final.exists() and self.status == "completed":
            result = json.loads(final.read_text())
            out.update({k: result[k] for k in ("gsm8k_accuracy", "gsm8k_correct", "gsm8k_format_rate",
                                               "num_examples")})
            out["source"] = "distft.eval"
        return out

    @property
    def lr(self) -> float | None:
        return self.summary.get("lr") or (self.config.get("trainer") or {}).get("lr")

    def choice(self, name: str) -> str | None:
        return self.summary.get(name) or (self.config.get(name) or {}).get("name")


def load_run(run_dir: Path, *, error: str | None = None) -> Run:
    """Read summary.json and config.yaml; a directory without a summary is `failed` if training started there
    (config.yaml written), else `missing`."""
    run_dir = Path(run_dir)
    started = (run_dir / "config.yaml").exists()
    # A sweep job that never started still has the config Hydra composed for it, so it joins its arm's row.
    config_path = run_dir / "config.yaml" if started else run_dir / "hydra" / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        status = "failed" if started or error else "missing"
        return Run(run_dir, status, config=config, error=error or ("no summary.json" if started else "no run here"))
    summary = json.loads(summary_path.read_text())
    status = "completed" if summary.get("status") == "completed" else "failed"
    return Run(run_dir, status, summary=summary, config=config, error=summary.get("error") or error)


def collect(paths: list[Path]) -> list[tuple[str | None, Run]]:
    """(arm name or None, run) for every run under `paths`: run dirs, compare dirs, or sweep dirs of run dirs."""
    out: list[tuple[str | None, Run]] = []
    for path in map(Path, paths):
        if (path / "compare.json").exists():
            record = json.loads((path / "compare.json").read_text())
            for name, arm in record["arms"].items():
                error = arm.get("error") if arm.get("status") not in ("completed", "running", "pending") else None
                out.append((name, load_run(Path(arm["run_dir"]), error=error)))
        elif _is_run_dir(path) or not path.exists():
            out.append((None, load_run(path)))
        else:  # a sweep directory: every child that looks like a run
            children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p))
            if not children:
                raise FileNotFoundError(f"{path} holds no run directories (no summary.json or config.yaml below it)")
            out += [(None, load_run(p)) for p in children]
    return out


def _is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("summary.json", "config.yaml", "metrics.jsonl", "hydra"))


def group_arms(runs: list[tuple[str | None, Run]]) -> dict[str, list[Run]]:
    """Arm name -> its runs. Unnamed runs are grouped by the ARM_FIELDS that differ between them."""
    named = [(n, r) for n, r in runs if n is not None]
    loose = [r for n, r in runs if n is None]
    arms: dict[str, list[Run]] = {}
    for name, run in named:
        arms.setdefault(name, []).append(run)
    varying = [f for f in ARM_FIELDS if len({r.choice(f) for r in loose if r.choice(f) is not None}) > 1]
    for run in loose:
        if run.choice("method") is None:  # nothing says which arm it belongs to
            key = run.run_dir.name
        else:
            key = "-".join(str(run.choice(f)) for f in (varying or ARM_FIELDS[:1]))
        arms.setdefault(key, []).append(run)
    return arms


def best_run(runs: list[Run]) -> Run:
    """Highest GSM8K accuracy, then lowest eval loss, among completed runs; else the first run."""
    done = [r for r in runs if r.status == "completed"]
    if not done:
        return runs[0]

    def key(r: Run):
        acc = r.eval.get("gsm8k_accuracy")
        loss = r.eval.get("eval_loss")
        return (-(acc if acc is not None else -1.0), loss if loss is not None else math.inf)

    return min(done, key=key)


def dir_bytes(path: Path) -> int | None:
    if not path.exists():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_bytes(run_dir: Path) -> int | None:
    """Size on disk of the newest checkpoint Ray Train kept in the run directory."""
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return dir_bytes(ckpts[-1]) if ckpts else None


def cost_usd(run: Run) -> float | None:
    """Workers (x GPUs per worker on GPU) x wall hours x hardware.gpu_hour_usd; None when no price is set."""
    price = (run.config.get("hardware") or {}).get("gpu_hour_usd")
    wall = run.summary.get("wall_seconds")
    if price is None or wall is None:
        return None
    scaling = run.config.get("scaling") or {}
    devices = scaling.get("num_workers", 1) * (scaling.get("gpus_per_worker", 1) if scaling.get("use_gpu") else 1)
    return devices * wall / 3600 * price


def arm_row(name: str, runs: list[Run]) -> dict:
    """Everything the table and plots show for one arm (its best run)."""
    run = best_run(runs)
    ev = run.eval
    n, k = ev.get("num_examples"), ev.get("gsm8k_correct")
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    row = {
        "arm": name, "status": run.status, "run_dir": str(run.run_dir), "error": run.error,
        "method": run.choice("method"), "strategy": run.choice("strategy"), "model": run.choice("model"),
        "lr": run.lr, "lrs_tried": lrs, "runs": len(runs),
        "runs_failed": sum(r.status != "completed" for r in runs),
        "gsm8k_accuracy": ev.get("gsm8k_accuracy"), "gsm8k_n": n, "gsm8k_correct": k,
        "gsm8k_ci95": list(wilson_interval(k, n)) if n and k is not None else None,
        "format_rate": ev.get("gsm8k_format_rate"), "eval_loss": ev.get("eval_loss"),
        "peak_memory_bytes": run.summary.get("peak_memory_bytes"),
        "tokens_per_second": run.summary.get("tokens_per_second"),
        "wall_seconds": run.summary.get("wall_seconds"),
        "trainable_params": run.summary.get("trainable_params"), "total_params": run.summary.get("total_params"),
        "steps": run.summary.get("steps"),
        "checkpoint_bytes": checkpoint_bytes(run.run_dir),
        "export_bytes": dir_bytes(run.run_dir / "export") if run.status == "completed" else None,
        "num_workers": (run.config.get("scaling") or {}).get("num_workers") or run.summary.get("num_workers"),
        "cost_usd": cost_usd(run),
    }
    return row


COLUMNS = ("arm", "status", "lr (tried)", "GSM8K acc [95% CI] (n)", "format", "eval loss", "peak mem/worker",
           "tokens/s", "wall", "trainable params", "ckpt size", "export size", "cost")


def table_cells(row: dict) -> list[str]:
    if row["status"] == "missing":
        return [row["arm"], "missing"] + ["—"] * (len(COLUMNS) - 2)
    acc = "—"
    if row["gsm8k_accuracy"] is not None:
        lo, hi = row["gsm8k_ci95"] or (math.nan, math.nan)
        acc = f"{row['gsm8k_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (n={row['gsm8k_n']})"
    tried = ", ".join(f"{x:g}" for x in row["lrs_tried"])
    lr = f"{row['lr']:g}" if row["lr"] is not None else "—"
    lr_cell = f"{lr} ({tried})" if len(row["lrs_tried"]) > 1 else lr
    status = row["status"] + (f" ({row['runs_failed']}/{row['runs']} runs failed)"
                              if row["runs_failed"] and row["status"] == "completed" else "")
    return [row["arm"], status, lr_cell, acc, _num(row["format_rate"], ".3f"), _num(row["eval_loss"], ".4f"),
            _bytes(row["peak_memory_bytes"]), _num(row["tokens_per_second"], ".1f"), _seconds(row["wall_seconds"]),
            _count(row["trainable_params"]), _bytes(row["checkpoint_bytes"]), _bytes(row["export_bytes"]),
            f"${row['cost_usd']:.2f}" if row["cost_usd"] is not None else "n/a"]


def markdown(rows: list[dict], sources: list[Path]) -> str:
    lines = ["# distft comparison report", "",
             "Sources: " + ", ".join(f"`{s}`" for s in sources), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    lines += ["", "GSM8K accuracy: exact match after `####` on the first n test questions, greedy decoding; the interval "
              "is a 95% Wilson score interval. Peak memory is the largest per-worker peak (GPU allocator peak on "
              "GPU, process RSS peak on CPU). tokens/s counts all tokens of the global batch, first step excluded. "
              "Cost = workers x wall hours x `hardware.gpu_hour_usd` (n/a when unset). Sizes are measured on disk "
              "(newest checkpoint; export directory). With several runs per arm the best (accuracy, then eval loss) "
              "is shown and `lr (tried)` lists every learning rate.", ""]
    problems = [r for r in rows if r["status"] != "completed"]
    if problems:
        lines += ["## Failed or missing", ""]
        lines += [f"- **{r['arm']}** ({r['status']}): `{r['run_dir']}` — {r['error'] or 'no details'}" for r in problems]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    lines += ["## Runs", ""] + [f"- {r['arm']}: `{r['run_dir']}` ({r['method']}, {r['strategy']}, "
                                f"{r['model']}, {r['steps']} steps)" for r in rows if r["status"] != "missing"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """The three PNGs; arms without data are left out of a plot but stay in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        if r["status"] != "missing" and metrics.exists():
            pts = [(m["step"], m["loss"]) for m in read_metrics(metrics) if "loss" in m]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{r['arm']} (lr {r['lr']:g})" if r["lr"] else r["arm"])
    ax.set(xlabel="optimizer step", ylabel="training loss (answer tokens)", title="Training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    paths.append(_save(fig, out_dir / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["gsm8k_accuracy"] is None or r["peak_memory_bytes"] is None:
            continue
        x, y = r["peak_memory_bytes"] / 2**30, r["gsm8k_accuracy"]
        lo, hi = r["gsm8k_ci95"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4, label=r["arm"])
        ax.annotate(r["arm"], (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set(xlabel="peak memory per worker (GiB)", ylabel="GSM8K accuracy (95% Wilson CI)",
           title="Accuracy vs peak memory")
    ax.set_ylim(-0.02, 1.02)
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / PLOTS[1]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    named = [r for r in rows if r["tokens_per_second"] is not None]
    ax.bar([r["arm"] for r in named], [r["tokens_per_second"] for r in named], color="tab:blue")
    ax.set(ylabel="tokens / s (all workers)", title="Training throughput")
    ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, out_dir / PLOTS[2]))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(paths: list[Path], *, out_dir: Path | None = None, wandb: str = "auto") -> Path:
    """Build report.md, report.json and the plots in `out_dir` (default: the single source directory, else cwd);
    log them to W&B when `wandb` is "on", or "auto" and the runs used logger=wandb. Returns report.md's path."""
    paths = [Path(p).resolve() for p in paths]
    if out_dir is None:
        out_dir = paths[0] if len(paths) == 1 and paths[0].is_dir() else Path.cwd()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collect(paths)
    rows = [arm_row(name, arm_runs) for name, arm_runs in group_arms(runs).items()]
    plot(rows, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(rows, paths))
    (out_dir / "report.json").write_text(json.dumps(rows, indent=2, default=str))
    logger = _wandb_settings([r for _, r in runs], wandb)
    if logger is not None:
        log_to_wandb(rows, out_dir, **logger)
    return report


def _wandb_settings(runs: list[Run], mode: str) -> dict | None:
    if mode == "off":
        return None
    configs = [r.config.get("logger") or {} for r in runs]
    used = [c for c in configs if c.get("name") == "wandb"]
    if mode == "auto" and not used:
        return None
    c = used[0] if used else {}
    return {"project": c.get("project", "distft"), "entity": c.get("entity"), "group": c.get("group"),
            "mode": c.get("mode")}


def log_to_wandb(rows: list[dict], out_dir: Path, *, project: str, entity: str | None, group: str | None,
                 mode: str | None) -> None:
    """The table and plots as one W&B run (job_type=report). Failures are warnings: the files are already written."""
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, group=group, mode=mode, job_type="report",
                         name=f"report-{group or out_dir.name}", dir=str(out_dir), reinit="create_new")
        run.log({"compare/table": wandb.Table(columns=list(COLUMNS), data=[table_cells(r) for r in rows]),
                 **{f"compare/{p[:-4]}": wandb.Image(str(out_dir / p)) for p in PLOTS}})
        run.finish()
    except Exception as e:  # noqa: BLE001 - reporting must not fail because W&B did
        log.warning("W&B report upload failed: %s", e)


def _num(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else "—"


def _bytes(n) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "—"


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _seconds(s) -> str:
    if s is None:
        return "—"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or one sweep / compare directory")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and the PNGs go "
                        "(default: the single directory given, else the current directory)")
    parser.add_argument("--wandb", choices=("auto", "on", "off"), default="auto",
                        help="log the table and plots to W&B (auto: when the runs used logger=wandb)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.paths, out_dir=args.out, wandb=args.wandb)
    except FileNotFoundError as e:
        print(f"distft.report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"wrote {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
