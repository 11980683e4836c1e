"""`python -m distft.report RUN_DIR... | SWEEP_DIR | COMPARE_DIR [--out DIR] [--samples K]`: side-by-side report.

Writes report.md, report.json and PNG plots (training loss curves overlaid, accuracy vs peak memory, tokens/s, and
accuracy vs LoRA rank when the runs vary it), and logs the same tables and plots to the runs' W&B group when they
used `logger=wandb`. report.md holds:

- one table row per arm (accuracy of the task's headline metric with a 95% interval, memory, speed, sizes, cost),
  and a `base model` row from the runs' evaluation before training (`eval.at_start`);
- paired comparisons: for each pair of arms (and the base model), McNemar's test on the questions both answered;
- a LoRA rank x learning rate grid when the runs vary both;
- the first K test questions with the base model's and every arm's answers side by side;
- the config keys that differ between arms.

What counts as an arm: in a compare directory (compare.json), each named arm (with `compare.seeds`, its runs of
every seed); elsewhere, runs that share method, strategy and model. Within an arm, runs whose configs agree except
for `trainer.seed` are one setting (its seeds); in a sweep over `trainer.lr` the arm's best setting (highest mean
accuracy, then lowest eval loss) is reported with the learning rates tried. Runs that failed or never wrote a
summary are rows marked `failed` or `missing`, never dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path

import yaml

from distft import stats
from distft.eval import wilson_interval
from distft.tracking import read_metrics

log = logging.getLogger(__name__)

ARM_FIELDS = ("method", "strategy", "model")  # runs that agree on these are one arm (sweeps vary the rest)
PLOTS = ("loss_curves.png", "accuracy_vs_memory.png", "tokens_per_second.png")
RANK_PLOT = "accuracy_vs_rank.png"  # only when some arm's runs vary method.lora_r
# Config keys that differ between any two runs by construction: left out of the config diff and of "same setting".
RUN_SPECIFIC_KEYS = ("run.name", "run.storage_path", "logger.group", "hydra")
LORA_METHODS = ("lora", "qlora")
ANSWER_CHARS = 400  # longer answers are cut in the side-by-side table (report.json and the predictions keep all)
METRIC_LABELS = {"gsm8k_accuracy": "GSM8K acc", "sql_exact_match": "SQL exact match",
                 "sql_execution_match": "SQL execution match", "viggo_exact_match": "ViGGO exact match",
                 "viggo_function_match": "ViGGO function match"}
# Each task's other metrics, as columns after the fixed ones (only when some row has them): row key -> heading.
EXTRA_COLUMNS = {"lm_eval_strict": "lm-eval strict", "lm_eval_flexible": "lm-eval flexible",
                 "sql_execution_match": "SQL execution match", "viggo_function_match": "ViGGO function match"}


@dataclass
class Run:
    """One run directory as the report sees it."""

    run_dir: Path
    status: str  # completed | failed | missing
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    error: str | None = None

    @cached_property
    def final_eval(self) -> dict:
        """`distft.eval`'s result on the export (compare.final_eval: <run dir>/eval_<task>.json), or {}."""
        path = self.run_dir / f"eval_{self.data_name}.json"
        if self.status != "completed" or not path.exists():
            return {}
        return json.loads(path.read_text())

    @property
    def data_name(self) -> str:
        return (self.config.get("data") or {}).get("name") or (self.summary.get("eval") or {}).get("task") or "gsm8k"

    @property
    def eval(self) -> dict:
        """The run's final eval; the numbers of `distft.eval` (eval_<task>.json) replace the training-time ones when
        present (usually more examples). Eval loss stays the training-time one."""
        out = dict(self.summary.get("eval") or {})
        result = self.final_eval
        if result:
            for key in ("task", "metric", "accuracy", "correct"):  # an older result file may lack them
                out.pop(key, None)
            task = result.get("task") or self.data_name
            out.update({k: v for k, v in result.items() if not isinstance(v, (list, dict))
                        and (k in ("task", "metric", "accuracy", "correct", "num_examples") or k.startswith(task + "_"))})
            out["source"] = "distft.eval"
        return out

    @property
    def lr(self) -> float | None:
        return self.summary.get("lr") or (self.config.get("trainer") or {}).get("lr")

    @property
    def seed(self) -> int | None:
        return (self.config.get("trainer") or {}).get("seed")

    @property
    def lora_r(self) -> int | None:
        """LoRA rank, for LoRA and QLoRA runs only (full fine-tuning has the key but does not use it)."""
        if self.choice("method") not in LORA_METHODS:
            return None
        return (self.config.get("method") or {}).get("lora_r")

    def choice(self, name: str) -> str | None:
        return self.summary.get(name) or (self.config.get(name) or {}).get("name")

    def predictions(self, *, start: bool = False) -> dict[int, dict]:
        """Index -> {"index", "prompt", "output", "gold", "correct", ...} for every scored question of the final
        evaluation (start: of the base model, before training). distft.eval's per-question results come first, then
        the run's predictions file; runs older than those files give the few samples summary.json kept, whose
        "correct" is None."""
        rows = [] if start else final_eval_rows(self.final_eval)
        path = self.run_dir / ("eval_start_predictions.jsonl" if start else "eval_predictions.jsonl")
        if not rows and path.exists():
            rows = read_metrics(path)
        if rows:
            return {int(r["index"]): r for r in rows}
        samples = (self.summary.get("eval_start" if start else "eval") or {}).get("samples") or []
        return {i: {"index": i, "prompt": s.get("question"), "output": s.get("output"), "gold": s.get("gold"),
                    "correct": None} for i, s in enumerate(samples)}


def final_eval_rows(result: dict) -> list[dict]:
    """Per-question rows of a distft.eval result: its "predictions", else "per_example" beside "outputs"."""
    if result.get("predictions"):
        return result["predictions"]
    outputs = result.get("outputs") or []
    return [{"index": i, "output": outputs[i] if i < len(outputs) else None, **scored}
            for i, scored in enumerate(result.get("per_example") or [])]


def load_run(run_dir: Path, *, error: str | None = None, config: dict | None = None) -> Run:
    """Read summary.json and config.yaml; a directory without a summary is `failed` if training started there
    (config.yaml written), else `missing`. `config` (compare.json's copy of the arm's config) stands in for a
    config.yaml that is not there."""
    run_dir = Path(run_dir)
    started = (run_dir / "config.yaml").exists()
    # A sweep job that never started still has the config Hydra composed for it, so it joins its arm's row.
    config_path = run_dir / "config.yaml" if started else run_dir / "hydra" / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else (config or {})
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
                run = load_run(arm_run_dir(path, name, arm), error=error, config=arm.get("config"))
                out.append((arm.get("arm", name), run))  # with compare.seeds, `name` is <arm>-seed<k>
        elif _is_run_dir(path) or not path.exists():
            out.append((None, load_run(path)))
        else:  # a sweep directory: every child that looks like a run
            children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p))
            if not children:
                raise FileNotFoundError(f"{path} holds no run directories (no summary.json or config.yaml below it)")
            out += [(None, load_run(p)) for p in children]
    return out


def arm_run_dir(compare_dir: Path, name: str, arm: dict) -> Path:
    """Where a compare arm's run is: compare.json stores it relative to the compare directory; older records hold
    the absolute path of the machine that ran them, used when it exists, else <compare dir>/<run name>."""
    run_dir = Path(arm.get("run_dir") or name)
    if not run_dir.is_absolute():
        return compare_dir / run_dir
    return run_dir if run_dir.exists() else compare_dir / name


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


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _run_specific(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RUN_SPECIFIC_KEYS)


def setting_key(run: Run) -> str:
    """Runs with equal keys are repeats of one setting (seeds): their configs agree except for trainer.seed."""
    if not run.config:
        return json.dumps([run.lr, str(run.run_dir)])
    flat = {k: v for k, v in flatten(run.config).items() if not _run_specific(k) and k != "trainer.seed"}
    return json.dumps(flat, sort_keys=True, default=str)


def accuracy(run: Run) -> float | None:
    return headline(run.eval)["accuracy"]


def _rank(runs: list[Run]) -> tuple[float, float]:
    """Sort key: highest mean accuracy, then lowest mean eval loss."""
    accs = [a for a in map(accuracy, runs) if a is not None]
    losses = [r.eval["eval_loss"] for r in runs if r.eval.get("eval_loss") is not None]
    return (-stats.mean_std(accs)[0] if accs else 1.0, stats.mean_std(losses)[0] if losses else math.inf)


def best_setting(runs: list[Run]) -> list[Run]:
    """The completed runs of the arm's best setting (mean over its seeds); [] when none completed."""
    settings: dict[str, list[Run]] = {}
    for run in runs:
        if run.status == "completed":
            settings.setdefault(setting_key(run), []).append(run)
    return min(settings.values(), key=_rank) if settings else []


def best_run(runs: list[Run]) -> Run:
    """The best seed of the best setting (accuracy, then eval loss) among completed runs; else the first run."""
    best = best_setting(runs)
    return min(best, key=lambda r: _rank([r])) if best else runs[0]


def by_seed(runs: list[Run]) -> dict:
    """Seed -> run (the first run of each seed)."""
    out: dict = {}
    for run in runs:
        out.setdefault(run.seed, run)
    return out


def headline(ev: dict) -> dict:
    """The task's headline metric of one evaluation. Summaries older than the task metrics have GSM8K's keys."""
    metric = ev.get("metric") or ("gsm8k_accuracy" if "gsm8k_accuracy" in ev else None)
    acc = ev["accuracy"] if ev.get("accuracy") is not None else ev.get(metric) if metric else None
    correct = ev["correct"] if ev.get("correct") is not None else \
        ev.get("gsm8k_correct") if metric == "gsm8k_accuracy" else None
    task = ev.get("task") or (metric.split("_")[0] if metric else None)
    return {"task": task, "metric": metric, "accuracy": acc, "correct": correct, "n": ev.get("num_examples")}


def eval_fields(ev: dict) -> dict:
    """The row's evaluation columns: the headline metric with its 95% Wilson interval, GSM8K's own keys (kept
    under their old names), lm-evaluation-harness's two GSM8K metrics, format rate and eval loss."""
    h = headline(ev)
    n, k, k_gsm8k = h["n"], h["correct"], ev.get("gsm8k_correct")
    return {
        "task": h["task"], "metric": h["metric"], "accuracy": h["accuracy"], "correct": k, "n": n,
        "ci95": list(wilson_interval(k, n)) if n and k is not None else None,
        "gsm8k_accuracy": ev.get("gsm8k_accuracy"), "gsm8k_n": n, "gsm8k_correct": k_gsm8k,
        "gsm8k_ci95": list(wilson_interval(k_gsm8k, n)) if n and k_gsm8k is not None else None,
        "lm_eval_strict": ev.get("gsm8k_strict_match"), "lm_eval_flexible": ev.get("gsm8k_flexible_extract"),
        "sql_execution_match": ev.get("sql_execution_match"), "viggo_function_match": ev.get("viggo_function_match"),
        "format_rate": ev.get("gsm8k_format_rate"), "eval_loss": ev.get("eval_loss"),
    }


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
    """Everything the table and plots show for one arm: its best run, and the accuracy of every seed of its best
    setting (mean ± std when there are several)."""
    run = best_run(runs)
    seeds = sorted(((r.seed, a) for r in best_setting(runs) if (a := accuracy(r)) is not None),
                   key=lambda p: (p[0] is None, p[0] or 0))
    mean, std = stats.mean_std([a for _, a in seeds]) if len(seeds) > 1 else (None, None)
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    row = {
        "arm": name, "status": run.status, "run_dir": str(run.run_dir), "error": run.error,
        "method": run.choice("method"), "strategy": run.choice("strategy"), "model": run.choice("model"),
        "lr": run.lr, "lrs_tried": lrs, "runs": len(runs), "lora_r": run.lora_r, "seed": run.seed,
        "runs_failed": sum(r.status != "completed" for r in runs),
        **eval_fields(run.eval),
        "seed_accuracies": [[s, a] for s, a in seeds] if len(seeds) > 1 else None,
        "accuracy_mean": mean, "accuracy_std": std,
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


@dataclass
class Base:
    """The base model's evaluation before training, taken from one arm's run."""

    label: str  # "base model", or "base model (<model>)" when the arms fine-tune several models
    arm: str  # the arm whose eval_start it is
    run: Run


def find_bases(arms: dict[str, list[Run]]) -> list[Base]:
    """One base model per model the arms fine-tune, from the eval_start of the first arm that has one. QLoRA
    arms come last: their eval_start scores the 4-bit quantised base."""
    found: dict[str, tuple[str, Run]] = {}
    order = sorted(arms.items(), key=lambda item: best_run(item[1]).choice("method") == "qlora")
    for name, runs in order:
        run = best_run(runs)
        if run.summary.get("eval_start") and run.choice("model") not in found:
            found[run.choice("model")] = (name, run)
    several = len({best_run(r).choice("model") for r in arms.values()}) > 1
    return [Base("base model" + (f" ({model})" if several else ""), name, run)
            for model, (name, run) in found.items()]


def base_row(base: Base) -> dict:
    """A table row for the base model: its evaluation only (it did not train)."""
    run = base.run
    return {"arm": base.label, "status": "base", "base_of": base.arm, "run_dir": str(run.run_dir), "error": None,
            "method": None, "strategy": None, "model": run.choice("model"), "lr": None, "lrs_tried": [], "runs": 1,
            "lora_r": None, "seed": None, "runs_failed": 0, **eval_fields(run.summary["eval_start"]),
            "quantised": run.choice("method") == "qlora", "seed_accuracies": None, "accuracy_mean": None,
            "accuracy_std": None, "peak_memory_bytes": None, "tokens_per_second": None, "wall_seconds": None,
            "trainable_params": None, "total_params": run.summary.get("total_params"), "steps": None,
            "checkpoint_bytes": None, "export_bytes": None, "num_workers": None, "cost_usd": None}


# --- paired comparisons --------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a paired comparison: its runs by seed (the base model: one set of answers for every seed)."""

    label: str
    runs: dict  # seed -> Run
    start: bool = False  # True: the base model (the run's eval_start answers)

    def answers(self, seed) -> dict[int, dict]:
        run = self.runs[seed] if seed in self.runs else next(iter(self.runs.values()))
        return run.predictions(start=self.start)


def sides(arms: dict[str, list[Run]], bases: list[Base]) -> list[Side]:
    """Every arm with completed runs (its best setting, by seed), then the base models."""
    out = [Side(name, by_seed(best_setting(runs))) for name, runs in arms.items() if best_setting(runs)]
    return out + [Side(b.label, {None: b.run}, start=True) for b in bases]


def compare_pair(a: Side, b: Side) -> dict:
    """McNemar's test of two sides on the same questions: runs with the same seed are paired and their (seed,
    question) pairs pooled; sides without a common seed compare their best runs. A base model pairs with every
    seed of the other side. Questions whose text differs under the same index are left out."""
    if a.start or b.start:
        seeds = list((b if a.start else a).runs)
    else:
        seeds = [s for s in a.runs if s in b.runs]
    matched = bool(seeds)
    seeds = seeds or [None]
    correct_a, correct_b, mismatched = {}, {}, 0
    for seed in seeds:
        rows_a, rows_b = a.answers(seed), b.answers(seed)
        for index, row_a in rows_a.items():
            row_b = rows_b.get(index)
            if row_b is None or row_a.get("correct") is None or row_b.get("correct") is None:
                continue
            if row_a.get("prompt") and row_b.get("prompt") and row_a["prompt"] != row_b["prompt"]:
                mismatched += 1
                continue
            correct_a[(seed, index)], correct_b[(seed, index)] = row_a["correct"], row_b["correct"]
    result = stats.paired(correct_a, correct_b)
    return {"a": a.label, "b": b.label, "n": result.n, "acc_a": result.acc_a, "acc_b": result.acc_b,
            "difference": result.difference, "b_only_a": result.b, "b_only_b": result.c, "p_value": result.p_value,
            "verdict": stats.verdict(a.label, b.label, result) if result.n else "no per-question results in common",
            "seeds": seeds if matched and len(seeds) > 1 else None, "seed_matched": matched,
            "mismatched_questions": mismatched}


def paired_comparisons(all_sides: list[Side]) -> list[dict]:
    """Every pair of sides (arms first, then each arm against the base model)."""
    return [compare_pair(a, b) for a, b in combinations(all_sides, 2)]


# --- LoRA rank x learning rate grid ---------------------------------------------------------------------------------


def rank_grids(arms: dict[str, list[Run]]) -> list[dict]:
    """Accuracy by (method.lora_r, trainer.lr) for every method/strategy/model whose completed runs vary the LoRA
    rank, across all arms (a sweep's arm, or compare arms that differ in rank). A cell with several runs (seeds)
    holds their mean."""
    groups: dict[tuple, list[Run]] = {}
    for runs in arms.values():
        for run in runs:
            if run.status == "completed" and run.lora_r is not None and accuracy(run) is not None:
                groups.setdefault(tuple(run.choice(f) for f in ARM_FIELDS), []).append(run)
    grids = []
    for (method, strategy, model), runs in groups.items():
        ranks = sorted({r.lora_r for r in runs})
        if len(ranks) < 2:
            continue
        lrs = sorted({r.lr for r in runs}, key=lambda x: (x is None, x or 0))
        cells = {}
        for run in runs:
            cells.setdefault((run.lora_r, run.lr), []).append(accuracy(run))
        grids.append({"title": f"{method} ({strategy}, {model})", "ranks": ranks, "lrs": lrs,
                      "cells": [[r, lr, stats.mean_std(v)[0], len(v)] for (r, lr), v in sorted(
                          cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))]})
    return grids


def grid_lines(grid: dict) -> list[str]:
    cells = {(r, lr): (acc, k) for r, lr, acc, k in grid["cells"]}
    head = ["lora_r / lr", *(_lr(lr) for lr in grid["lrs"])]
    lines = [f"### {grid['title']}", "", _table_row(head), "|" + "---|" * len(head)]
    for rank in grid["ranks"]:
        row = [str(rank)]
        for lr in grid["lrs"]:
            acc, k = cells.get((rank, lr), (None, 0))
            row.append("—" if acc is None else f"{acc:.3f}" + (f" ({k} runs)" if k > 1 else ""))
        lines.append(_table_row(row))
    return lines + [""]


# --- answers side by side, config diff ------------------------------------------------------------------------------


def answer_columns(arms: dict[str, list[Run]], bases: list[Base]) -> list[tuple[str, dict[int, dict]]]:
    """(label, index -> prediction row): the base models first, then each arm's best run."""
    out = [(f"{b.label} (before training; from arm {b.arm})", b.run.predictions(start=True)) for b in bases]
    for name, runs in arms.items():
        run = best_run(runs)
        if run.status == "completed":
            several = len(best_setting(runs)) > 1
            out.append((f"{name} (seed {run.seed})" if several else name, run.predictions()))
    return [(label, rows) for label, rows in out if rows]


def sample_lines(columns: list[tuple[str, dict[int, dict]]], k: int) -> list[str]:
    """The first k test questions, each with every column's answer and whether it was right."""
    indices = sorted({i for _, rows in columns for i in rows})[:k]
    lines = []
    for index in indices:
        prompt, gold = (_first(columns, index, key) for key in ("prompt", "gold"))
        lines += [f"**Question {index}.** {cell(prompt or '(question text not recorded)', 2 * ANSWER_CHARS)}", ""]
        if gold is not None:
            lines += [f"Gold: {cell(gold, ANSWER_CHARS)}", ""]
        lines += [_table_row(["model", "correct", "answer"]), "|---|---|---|"]
        for label, rows in columns:
            row = rows.get(index)
            if row is None:
                lines.append(_table_row([label, "—", "(not evaluated)"]))
                continue
            mark = {True: "✓", False: "✗"}.get(row.get("correct"), "—")
            lines.append(_table_row([label, mark, cell(row.get("output") or "", ANSWER_CHARS)]))
        lines.append("")
    return lines


def _first(columns: list[tuple[str, dict[int, dict]]], index: int, key: str):
    """The first column's value of `key` for question `index` (the question text and gold are the same in all)."""
    return next((rows[index][key] for _, rows in columns if rows.get(index, {}).get(key) is not None), None)


UNSET = object()  # a key one config has and another lacks


def config_diff(configs: dict[str, dict], *, ignore: tuple[str, ...] = ()) -> list[tuple[str, list]]:
    """(dotted key, value per arm; UNSET where a config lacks the key) for every key whose value is not the same in
    every config; run-specific keys (run name, storage path, W&B group, Hydra's own) and `ignore` are left out."""
    flat = {name: flatten(c) for name, c in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    out = []
    for key in keys:
        if _run_specific(key) or key in ignore:
            continue
        values = [f.get(key, UNSET) for f in flat.values()]
        if any(v != values[0] for v in values[1:]):
            out.append((key, values))
    return out


def diff_lines(arms: dict[str, list[Run]]) -> list[str]:
    """The config keys that differ between the arms' best runs (config.yaml, or compare.json's copy)."""
    configs = {name: best_run(runs).config for name, runs in arms.items() if best_run(runs).config}
    if len(configs) < 2:
        return ["Fewer than two arms have a recorded config (config.yaml); nothing to compare.", ""]
    seeded = any(len(best_setting(runs)) > 1 for runs in arms.values())
    diff = config_diff(configs, ignore=("trainer.seed",) if seeded else ())
    if not diff:
        return ["The arms' configs agree on every key (apart from run name, storage path and W&B group).", ""]
    lines = [_table_row(["key", *configs]), "|" + "---|" * (len(configs) + 1)]
    lines += [_table_row([f"`{key}`", *(cell(_value(v)) for v in values)]) for key, values in diff]
    return lines + [""]


def _value(v) -> str:
    if v is UNSET:
        return "(not in this config)"
    return v if isinstance(v, str) else json.dumps(v)


def cell(text, limit: int | None = None) -> str:
    """Text that stays inside one Markdown table cell: HTML and pipes escaped, newlines as <br>, cut at `limit`
    characters with a note saying how much was left out."""
    text = str(text)
    note = ""
    if limit is not None and len(text) > limit:
        note = f" … *(cut: {len(text) - limit} more characters)*"
        text = text[:limit]
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>") + note


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- the arm table --------------------------------------------------------------------------------------------------


def metric_label(metric: str | None) -> str:
    return METRIC_LABELS.get(metric, metric or "accuracy")


def table_columns(rows: list[dict]) -> list[str]:
    """The arm table's headings. The accuracy column names the task's metric when every row has the same one;
    the tasks' other metrics (GSM8K's lm-evaluation-harness pair, SQL execution match, ViGGO function match) come
    last, only when some row has them."""
    metrics = {r["metric"] for r in rows if r["metric"] is not None}
    label = metric_label(metrics.pop()) if len(metrics) == 1 else "GSM8K acc" if not metrics else "accuracy"
    columns = ["arm", "status", "lr (tried)", f"{label} [95% CI] (n)", "format", "eval loss", "peak mem/worker",
               "tokens/s", "wall", "trainable params", "ckpt size", "export size", "cost"]
    return columns + [label for key, label in EXTRA_COLUMNS.items() if any(r.get(key) is not None for r in rows)]


def accuracy_cell(row: dict, *, name_metric: bool) -> str:
    if row["accuracy"] is None:
        return "—"
    prefix = f"{metric_label(row['metric'])}: " if name_metric else ""
    if row["seed_accuracies"]:
        return (f"{prefix}{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} "
                f"({len(row['seed_accuracies'])} seeds, n={row['n']} each)")
    lo, hi = row["ci95"] or (math.nan, math.nan)
    return f"{prefix}{row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (n={row['n']})"


def table_cells(row: dict, columns: list[str], *, name_metric: bool = False) -> list[str]:
    if row["status"] == "missing":
        return [row["arm"], "missing"] + ["—"] * (len(columns) - 2)
    tried = ", ".join(f"{x:g}" for x in row["lrs_tried"])
    lr = _lr(row["lr"])
    lr_cell = f"{lr} ({tried})" if len(row["lrs_tried"]) > 1 else lr
    if row["status"] == "base":
        status = f"base model, before training (eval_start of {row['base_of']}" + \
                 (", 4-bit quantised)" if row.get("quantised") else ")")
    else:
        status = row["status"] + (f" ({row['runs_failed']}/{row['runs']} runs failed)"
                                  if row["runs_failed"] and row["status"] == "completed" else "")
    cost = "—" if row["status"] == "base" else f"${row['cost_usd']:.2f}" if row["cost_usd"] is not None else "n/a"
    cells = [row["arm"], status, lr_cell, accuracy_cell(row, name_metric=name_metric), _num(row["format_rate"], ".3f"),
             _num(row["eval_loss"], ".4f"), _bytes(row["peak_memory_bytes"]), _num(row["tokens_per_second"], ".1f"),
             _seconds(row["wall_seconds"]), _count(row["trainable_params"]), _bytes(row["checkpoint_bytes"]),
             _bytes(row["export_bytes"]), cost]
    return cells + [_num(row.get(key), ".3f") for key, label in EXTRA_COLUMNS.items() if label in columns]


def _several_metrics(rows: list[dict]) -> bool:
    return len({r["metric"] for r in rows if r["metric"] is not None}) > 1


# --- report.md ------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything report.md, report.json, the plots and W&B show."""

    sources: list[Path]
    runs: list[Run]
    rows: list[dict]  # base model rows first, then one per arm
    pairs: list[dict]
    grids: list[dict]
    samples: list[str]  # Markdown lines of the side-by-side answers ([] when samples=0)
    diff: list[str]  # Markdown lines of the config diff
    plots: list[str]

    @property
    def columns(self) -> list[str]:
        return table_columns(self.rows)

    def table(self) -> list[list[str]]:
        several = _several_metrics(self.rows)
        return [table_cells(r, self.columns, name_metric=several) for r in self.rows]


EXPLANATION = (
    "Accuracy: the task's headline metric (GSM8K: exact match of the number after `####`; SQL and ViGGO: exact "
    "match after normalisation) on the first n test questions, greedy decoding; the interval is a 95% Wilson score "
    "interval. With several seeds per arm (`compare.seeds`) the cell is mean ± sample std over the seeds. "
    "`lm-eval strict` / `lm-eval flexible` are lm-evaluation-harness's GSM8K metrics (strict-match, "
    "flexible-extract); `SQL execution match`: the query returns the gold query's rows on the example's schema; "
    "`ViGGO function match`: the dialogue act alone. The base model row is the evaluation before training (`eval.at_start`). Peak memory is "
    "the largest per-worker peak (GPU allocator peak on GPU, process RSS peak on CPU). tokens/s counts all tokens "
    "of the global batch, first step excluded. Cost = workers x wall hours x `hardware.gpu_hour_usd` (n/a when "
    "unset). Sizes are measured on disk (newest checkpoint; export directory). With several runs per arm the best "
    "setting (mean accuracy, then eval loss) is shown and `lr (tried)` lists every learning rate.")

PAIRED_EXPLANATION = (
    "Each pair of arms on the questions both answered (matched by index in the test split): accuracy of each, "
    "their difference, the discordant questions (b: only A right; c: only B right) and McNemar's two-sided "
    f"p-value (exact binomial when b + c < {stats.EXACT_BELOW}, else chi-square with continuity correction). "
    f"Verdicts at p < {stats.ALPHA}; with b + c < {stats.min_discordant()} even a unanimous split could not reach "
    "it, so the arms cannot be told apart on these questions.")


def paired_lines(pairs: list[dict]) -> list[str]:
    head = ["A", "B", "n", "acc A", "acc B", "A − B", "b (only A)", "c (only B)", "p", "verdict"]
    lines = ["## Paired comparisons", ""]
    if not any(p["n"] for p in pairs):
        return lines + ["No paired tests: the runs recorded no per-question results (eval_predictions.jsonl) that "
                        "two arms share.", ""]
    lines += [PAIRED_EXPLANATION, ""]
    pooled = sorted({str(s) for p in pairs for s in (p["seeds"] or [])})
    if pooled:
        lines += [f"Runs with the same seed are paired and the (seed, question) pairs of seeds {', '.join(pooled)} "
                  "pooled, so n counts questions once per seed; the base model's answers pair with every seed.", ""]
    if any(not p["seed_matched"] for p in pairs):
        lines += ["Arms without a common seed are compared through their best runs.", ""]
    lines += [_table_row(head), "|" + "---|" * len(head)]
    for p in pairs:
        if p["n"]:
            nums = [f"{p['acc_a']:.3f}", f"{p['acc_b']:.3f}", f"{p['difference']:+.3f}", str(p["b_only_a"]),
                    str(p["b_only_b"]), f"{p['p_value']:.3g}"]
        else:
            nums = ["—"] * 6
        lines.append(_table_row([p["a"], p["b"], str(p["n"]), *nums, p["verdict"]]))
    skipped = sum(p["mismatched_questions"] for p in pairs)
    if skipped:
        lines += ["", f"{skipped} question pairs were left out: the two arms have different question text under "
                      "the same index (different test data?)."]
    return lines + [""]


def markdown(report: Report) -> str:
    columns = report.columns
    lines = ["# distft comparison report", "",
             "Sources: " + ", ".join(f"`{s}`" for s in report.sources), "",
             _table_row(columns), "|" + "---|" * len(columns)]
    lines += [_table_row(cells) for cells in report.table()]
    lines += ["", EXPLANATION, ""]
    problems = [r for r in report.rows if r["status"] not in ("completed", "base")]
    if problems:
        lines += ["## Failed or missing", ""]
        lines += [f"- **{r['arm']}** ({r['status']}): `{r['run_dir']}` — {r['error'] or 'no details'}" for r in problems]
        lines.append("")
    if report.pairs:
        lines += paired_lines(report.pairs)
    if report.grids:
        lines += ["## Accuracy by LoRA rank and learning rate", "",
                  "Rows: `method.lora_r`; columns: `trainer.lr`; a cell with several runs (seeds) is their mean.", ""]
        for grid in report.grids:
            lines += grid_lines(grid)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report.plots] + [""]
    if report.samples:
        lines += ["## Answers side by side", ""] + report.samples
    lines += ["## Config differences between arms", ""] + report.diff
    lines += ["## Runs", ""] + [f"- {r['arm']}: `{r['run_dir']}` ({r['method']}, {r['strategy']}, "
                                f"{r['model']}, {r['steps']} steps)" for r in report.rows
                                if r["status"] not in ("missing", "base")]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------------------------------


def plot(rows: list[dict], out_dir: Path, grids: list[dict] | None = None) -> list[Path]:
    """The PNGs; arms without data are left out of a plot but stay in the table. The base model row appears as a
    dashed line in the accuracy plot only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in rows if r["status"] != "base"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in arms:
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

    paths.append(_accuracy_plot(plt, rows, out_dir / PLOTS[1]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    named = [r for r in arms if r["tokens_per_second"] is not None]
    ax.bar([r["arm"] for r in named], [r["tokens_per_second"] for r in named], color="tab:blue")
    ax.set(ylabel="tokens / s (all workers)", title="Training throughput")
    ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, out_dir / PLOTS[2]))
    if grids:
        paths.append(_rank_plot(plt, grids, out_dir / RANK_PLOT))
    return paths


def _accuracy_plot(plt, rows: list[dict], path: Path) -> Path:
    """Accuracy vs peak memory: one point per arm with its 95% interval, or with several seeds every seed's point
    and the mean ± std; the base model as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["status"] == "base" and r["accuracy"] is not None:
            ax.axhline(r["accuracy"], color="grey", linestyle="--", linewidth=1, label=r["arm"])
        if r["status"] == "base" or r["accuracy"] is None or r["peak_memory_bytes"] is None:
            continue
        x = r["peak_memory_bytes"] / 2**30
        if r["seed_accuracies"]:
            y = r["accuracy_mean"]
            points = ax.scatter([x] * len(r["seed_accuracies"]), [a for _, a in r["seed_accuracies"]], s=14,
                                alpha=0.5)
            ax.errorbar([x], [y], yerr=[r["accuracy_std"]], fmt="o", capsize=4, color=points.get_facecolor()[0],
                        label=f"{r['arm']} ({len(r['seed_accuracies'])} seeds)")
        else:
            y = r["accuracy"]
            lo, hi = r["ci95"] or (y, y)
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4, label=r["arm"])
        ax.annotate(r["arm"], (x, y), textcoords="offset points", xytext=(6, 6))
    metrics = {r["metric"] for r in rows if r["metric"] is not None}
    label = metric_label(metrics.pop()) if len(metrics) == 1 else "accuracy"
    spread = "95% CI; several seeds: each seed, mean ± std" if any(r["seed_accuracies"] for r in rows) else "95% CI"
    ax.set(xlabel="peak memory per worker (GiB)", ylabel=f"{label} ({spread})", title="Accuracy vs peak memory")
    ax.set_ylim(-0.02, 1.02)
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    if any(r["status"] == "base" for r in rows) or any(r["seed_accuracies"] for r in rows):
        ax.legend(fontsize=8)
    return _save(fig, path)


def _rank_plot(plt, grids: list[dict], path: Path) -> Path:
    """Accuracy vs LoRA rank, one line per learning rate (per method when several methods vary the rank)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for grid in grids:
        for lr in grid["lrs"]:
            pts = sorted((r, acc) for r, x, acc, _ in grid["cells"] if x == lr)
            prefix = f"{grid['title']}, " if len(grids) > 1 else ""
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{prefix}lr {_lr(lr)}")
    ranks = sorted({r for g in grids for r in g["ranks"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="LoRA rank (method.lora_r)", ylabel="accuracy", title="Accuracy vs LoRA rank")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- putting it together --------------------------------------------------------------------------------------------


def build_report(paths: list[Path], *, samples: int = 5) -> Report:
    """Read every run under `paths` and work out the report's rows, tests, grids, answers and config diff."""
    runs = collect(paths)
    arms = group_arms(runs)
    bases = find_bases(arms)
    rows = [base_row(b) for b in bases] + [arm_row(name, runs) for name, runs in arms.items()]
    grids = rank_grids(arms)
    columns = answer_columns(arms, bases) if samples > 0 else []
    answer_lines = sample_lines(columns, samples) if columns else (
        ["No per-question answers were recorded (eval_predictions.jsonl).", ""] if samples > 0 else [])
    plots = list(PLOTS) + ([RANK_PLOT] if grids else [])
    return Report(sources=list(paths), runs=[r for _, r in runs], rows=rows, pairs=paired_comparisons(sides(arms, bases)), grids=grids,
                  samples=answer_lines, diff=diff_lines(arms), plots=plots)


def write_report(paths: list[Path], *, out_dir: Path | None = None, wandb: str = "auto", samples: int = 5) -> Path:
    """Build report.md, report.json and the plots in `out_dir` (default: the single source directory, else cwd);
    report.md shows the answers to the first `samples` questions. Log them to W&B when `wandb` is "on", or "auto"
    and the runs used logger=wandb. Returns report.md's path."""
    paths = [Path(p).resolve() for p in paths]
    if out_dir is None:
        out_dir = paths[0] if len(paths) == 1 and paths[0].is_dir() else Path.cwd()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(paths, samples=samples)
    plot(report.rows, out_dir, report.grids)
    path = out_dir / "report.md"
    path.write_text(markdown(report))
    (out_dir / "report.json").write_text(json.dumps(report.rows, indent=2, default=str))
    logger = _wandb_settings(report.runs, wandb)
    if logger is not None:
        log_to_wandb(report, out_dir, **logger)
    return path


def _wandb_settings(runs: list[Run], mode: str) -> dict | None:
    """Where the runs logged to W&B (the most common project, entity and group among them); None: no upload."""
    if mode == "off":
        return None
    used = [c for c in (r.config.get("logger") or {} for r in runs) if c.get("name") == "wandb"]
    if mode == "auto" and not used:
        return None

    def common(key: str, default=None):
        values = [c.get(key) for c in used if c.get(key) is not None]
        return Counter(values).most_common(1)[0][0] if values else default

    return {"project": common("project", "distft"), "entity": common("entity"), "group": common("group"),
            "mode": common("mode")}


def log_to_wandb(report: Report, out_dir: Path, *, project: str, entity: str | None, group: str | None,
                 mode: str | None) -> None:
    """The tables and plots as one W&B run (job_type=report) in the runs' group, so it sits beside them. Failures
    are warnings: the files are already written."""
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, group=group, mode=mode, job_type="report",
                         name=f"report-{group or out_dir.name}", dir=str(out_dir), reinit="create_new")
        data = {"compare/table": wandb.Table(columns=report.columns, data=report.table())}
        if report.pairs:
            keys = ["a", "b", "n", "acc_a", "acc_b", "difference", "b_only_a", "b_only_b", "p_value", "verdict"]
            data["compare/paired"] = wandb.Table(columns=keys, data=[[p[k] for k in keys] for p in report.pairs])
        for i, grid in enumerate(report.grids):
            data[f"compare/rank_grid_{i}"] = wandb.Table(columns=["method", "lora_r", "lr", "accuracy", "runs"],
                                                         data=[[grid["title"], *c] for c in grid["cells"]])
        data.update({f"compare/{p[:-4]}": wandb.Image(str(out_dir / p)) for p in report.plots})
        run.log(data)
        run.finish()
    except Exception as e:  # noqa: BLE001 - reporting must not fail because W&B did
        log.warning("W&B report upload failed: %s", e)


def _lr(lr) -> str:
    return f"{lr:g}" if lr is not None else "—"


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
                        help="log the tables and plots to W&B (auto: when the runs used logger=wandb)")
    parser.add_argument("--samples", type=int, default=5, metavar="K",
                        help="show the answers of the base model and every arm to the first K test questions "
                        "(0: none)")
    args = parser.parse_args(argv)
    if args.samples < 0:
        parser.error(f"--samples {args.samples}: give 0 or more questions")
    try:
        report = write_report(args.paths, out_dir=args.out, wandb=args.wandb, samples=args.samples)
    except FileNotFoundError as e:
        print(f"distft.report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"wrote {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
