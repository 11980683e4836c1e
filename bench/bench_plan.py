"""Planner vs measurement: predicted and measured peak memory per worker on CPU runs.

Runs short real training runs (2 Ray CPU workers, 2 optimizer steps, a checkpoint save, eval and export off) of the
tiny random Llama and SmolLM2-135M under ddp / zero3 / fsdp x full / lora / qlora, records each worker's measured
peak (resident memory of the worker process, `peak_memory_bytes_per_worker` in train_result.json) and compares it
with `distft.plan`'s prediction for the same composed config. Predictions are recomputed from the saved configs at
report time, so the table always reflects the planner in this tree.

    flock /tmp/distft-heavy.lock python bench/bench_plan.py --eval-export --out bench/results/plan_cpu.json   # ~25 min
    python bench/bench_plan.py --report bench/results/plan_cpu.json                               # the table
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distft.config import compose  # noqa: E402
from distft.methods import METHODS  # noqa: E402

MODELS = ("tiny_llama", "smollm2_135m")
STRATEGIES = ("ddp", "zero3", "fsdp")
SHORT = ("trainer.max_steps=2", "eval.enabled=false", "run.export=false", "trainer.checkpoint_every=100",
         "trainer.progress_bar=false", "data.max_train_examples=64", "scaling.num_workers=2")


# The same runs with evaluation (loss + GSM8K generation at the preset's batch size and answer length) and export
# on, to check the eval/generation and export phases too.
WITH_EVAL_EXPORT = ("eval.enabled=true", "eval.at_start=false", "eval.loss_examples=16", "eval.gsm8k_examples=16",
                    "run.export=true")


# The planner's CPU terms were calibrated with glibc's mmap threshold pinned (docs/planner.md); hardware=cpu leaves
# it dynamic for speed, so this bench pins it for its workers (`--override '~run.env.MALLOC_MMAP_THRESHOLD_'` undoes it).
PIN_MALLOC = "+run.env.MALLOC_MMAP_THRESHOLD_=131072"


def overrides(model: str, strategy: str, method: str, storage: Path, gsm8k: str, extra: tuple = ()) -> list[str]:
    name = f"{model}-{strategy}-{method}" + ("-eval-export" if extra else "")
    return [f"+experiment=gsm8k_{method}", f"model={model}", "hardware=cpu", PIN_MALLOC, f"strategy={strategy}",
            f"data.path={gsm8k}", f"run.storage_path={storage}", f"run.name={name}", *SHORT, *extra]


def cells(eval_export: bool):
    """(key, model, strategy, method, extra overrides) of every bench run."""
    for model in MODELS:
        for strategy in STRATEGIES:
            for method in METHODS:
                yield f"{model}/{strategy}/{method}", model, strategy, method, ()
    if eval_export:
        for strategy in STRATEGIES:
            yield f"smollm2_135m/{strategy}/lora/eval+export", "smollm2_135m", strategy, "lora", WITH_EVAL_EXPORT


def run_all(out: Path, storage: Path, gsm8k: str, only: list[str] | None, eval_export: bool,
            override: list[str]) -> None:
    import ray

    from distft.launch import launch

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "distft.ray_hooks.quiet_local_workers"})
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}
    for key, model, strategy, method, extra in cells(eval_export):
        if only and not any(o in key for o in only):
            continue
        ov = overrides(model, strategy, method, storage, gsm8k, extra) + override
        key += "".join(f"/{o}" for o in override)
        cfg = compose(ov)
        run_dir = storage / cfg.run.name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.time()
        summary = launch(cfg)
        result_path = Path(summary["run_dir"]) / "train_result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        results["runs"][key] = {
            "overrides": ov, "status": summary["status"], "error": summary["error"],
            "wall_seconds": time.time() - t0,
            "peak_memory_bytes_per_worker": result.get("peak_memory_bytes_per_worker"),
            "peak_memory_bytes_by_phase": result.get("peak_memory_bytes_by_phase"),
            "memory_at_start_bytes_per_worker": result.get("memory_at_start_bytes_per_worker"),
            "plan_at_run_time": summary.get("plan"),
        }
        print(key, summary["status"], result.get("peak_memory_bytes_per_worker"), flush=True)
        out.write_text(json.dumps(results, indent=2))
    ray.shutdown()


def measure_baseline(out: Path) -> None:
    """Resident memory of a Ray Train CPU worker before any model: the runtime the planner adds on CPU.

    Runs the real recipe up to its first line on 2 workers for each strategy family (a 1-step tiny run would also
    load a model), so here a Ray task imports exactly what a worker imports and reports its resident set."""
    import ray

    # the same allocator setting as this bench's runs (PIN_MALLOC)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"MALLOC_MMAP_THRESHOLD_": "131072"}})

    @ray.remote(num_cpus=1)
    def rss_after(modules: list[str]) -> int:
        import importlib

        for m in modules:
            importlib.import_module(m)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    sets = {"recipe": ["ray.train", "ray.train.torch", "distft.recipe"],
            "recipe+peft": ["ray.train", "ray.train.torch", "distft.recipe", "peft"],
            "recipe+peft+bitsandbytes": ["ray.train", "ray.train.torch", "distft.recipe", "peft", "bitsandbytes"],
            "recipe+deepspeed": ["ray.train", "ray.train.torch", "distft.recipe", "deepspeed",
                                 "distft.strategy.deepspeed"]}
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["baseline"] = {name: ray.get([rss_after.remote(mods) for _ in range(2)]) for name, mods in sets.items()}
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["baseline"], indent=2))
    ray.shutdown()


def report(path: Path) -> str:
    from distft.plan import plan_config

    results = json.loads(path.read_text())
    gib = 2**30
    lines = ["| model | strategy | method | predicted peak / worker | measured (rank 0, rank 1) | measured / predicted |"
             " of which runtime | mapped weights file | weights + states | activations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    phase_lines = ["| model | strategy | method | load | prepare | train | save | eval / generation | export |",
                   "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for key, run in results["runs"].items():
        model, strategy, method = key.split("/")[:3]
        for extra in key.split("/")[3:]:
            method += " + eval, export" if extra == "eval+export" else f" + `{extra}`"
        if run["status"] != "completed":
            lines.append(f"| {model} | {strategy} | {method} | – | failed: {run['error']} | – | – | – | – | – |")
            continue
        plan = plan_config(compose(run["overrides"]))
        measured = run["peak_memory_bytes_per_worker"]
        preds = [plan.memory.peak_for("rank0" if rank == 0 else "other") for rank in range(len(measured))]
        pred = max(preds)
        ratios = [m / p for m, p in zip(measured, preds, strict=True)]
        worst = max(worst, *(abs(r - 1) for r in ratios))
        c = plan.train
        states = c["weights"] + c["gradients"] + c["optimizer"] + c.get("lora", 0) + c.get("autocast_cache", 0)
        lines.append(
            f"| {model} | {strategy} | {method} | {pred / gib:.2f} GiB | "
            f"{', '.join(f'{m / gib:.2f}' for m in measured)} GiB | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | {c['runtime'] / gib:.2f} GiB | "
            f"{c['checkpoint_file'] / gib:.2f} GiB | {states / gib:.2f} GiB | {c['activations'] / gib:.2f} GiB |")
        by_phase = run.get("peak_memory_bytes_by_phase") or {}
        cells = []
        for phase in ("load", "prepare", "train", "save", "eval", "export"):
            if phase not in by_phase:
                cells.append("–")
                continue
            if phase not in plan.memory.phases:
                cells.append(" / ".join(f"{m / gib:.2f}" for m in by_phase[phase]))
                continue
            predicted = [plan.memory.phases[phase]["rank0" if rank == 0 else "other"] for rank in range(len(measured))]
            cells.append(" / ".join(f"{m / gib:.2f} ({m / p:.2f})" for m, p in zip(by_phase[phase], predicted,
                                                                                    strict=True)))
        phase_lines.append(f"| {model} | {strategy} | {method} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Largest deviation: {worst * 100:.1f}% of the prediction.")
    lines += ["", "Per phase (rank 0 / rank 1): measured peak GiB (measured / predicted; no ratio where the planner "
              "gives no figure for the phase)", "", *phase_lines]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "plan_cpu.json")
    parser.add_argument("--storage", type=Path, default=Path("/tmp/distft-bench-plan"))
    parser.add_argument("--gsm8k", default=os.environ.get("GSM8K_DIR", str(REPO.parent / "shared" / "data" / "gsm8k")))
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides added to every run (and to its key), e.g. ~run.env.MALLOC_MMAP_THRESHOLD_")
    parser.add_argument("--only", nargs="*", help="run only cells whose model/strategy/method contains one of these")
    parser.add_argument("--baseline", action="store_true", help="measure the runtime baseline of a worker")
    parser.add_argument("--eval-export", action="store_true",
                        help="also run SmolLM2 LoRA under each strategy with eval and export on (their phases)")
    parser.add_argument("--report", type=Path, help="print the markdown table for a results file")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
    elif args.baseline:
        measure_baseline(args.out)
    else:
        run_all(args.out, args.storage, args.gsm8k, args.only, args.eval_export, args.override)


if __name__ == "__main__":
    main()
