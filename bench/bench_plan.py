"""Planner vs measurement: predicted and measured peak memory per worker on CPU runs.

Runs short real training runs (2 Ray CPU workers, 2 optimizer steps, a checkpoint save, eval and export off) of the
tiny random Llama and SmolLM2-135M under ddp / zero3 / fsdp x full / lora / qlora, records each worker's measured
peak (resident memory of the worker process, `peak_memory_bytes_per_worker` in train_result.json) and compares it
with `distft.plan`'s prediction for the same composed config. Predictions are recomputed from the saved configs at
report time, so the table always reflects the planner in this tree.

    flock /tmp/distft-heavy.lock python bench/bench_plan.py --out bench/results/plan_cpu.json     # ~20 min
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

MODELS = ("tiny_llama", "smollm2_135m")
STRATEGIES = ("ddp", "zero3", "fsdp")
METHODS = ("full", "lora", "qlora")
SHORT = ("trainer.max_steps=2", "eval.enabled=false", "run.export=false", "trainer.checkpoint_every=100",
         "trainer.progress_bar=false", "data.max_train_examples=64", "scaling.num_workers=2")


def overrides(model: str, strategy: str, method: str, storage: Path, gsm8k: str) -> list[str]:
    return [f"+experiment=gsm8k_{method}", f"model={model}", "hardware=cpu", f"strategy={strategy}",
            f"data.path={gsm8k}", f"run.storage_path={storage}", f"run.name={model}-{strategy}-{method}", *SHORT]


def run_all(out: Path, storage: Path, gsm8k: str, only: list[str] | None) -> None:
    import ray

    from distft.train import launch
    from tests.conftest import compose_cfg

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "distft.train.quiet_local_workers"})
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}
    for model in MODELS:
        for strategy in STRATEGIES:
            for method in METHODS:
                key = f"{model}/{strategy}/{method}"
                if only and not any(o in key for o in only):
                    continue
                ov = overrides(model, strategy, method, storage, gsm8k)
                run_dir = storage / f"{model}-{strategy}-{method}"
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                t0 = time.time()
                summary = launch(compose_cfg(ov))
                result_path = Path(summary["run_dir"]) / "train_result.json"
                result = json.loads(result_path.read_text()) if result_path.exists() else {}
                results["runs"][key] = {
                    "overrides": ov, "status": summary["status"], "error": summary["error"],
                    "wall_seconds": time.time() - t0,
                    "peak_memory_bytes_per_worker": result.get("peak_memory_bytes_per_worker"),
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

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

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
    from tests.conftest import compose_cfg

    results = json.loads(path.read_text())
    gib = 2**30
    lines = ["| model | strategy | method | predicted peak / worker | measured (rank 0, rank 1) | measured / predicted |"
             " of which runtime (+ CPU load staging) | weights + states | activations |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for key, run in results["runs"].items():
        model, strategy, method = key.split("/")
        if run["status"] != "completed":
            lines.append(f"| {model} | {strategy} | {method} | – | failed: {run['error']} | – | – | – | – |")
            continue
        plan = plan_config(compose_cfg(run["overrides"]))
        measured = run["peak_memory_bytes_per_worker"]
        preds = [plan.memory.peak_for("rank0" if rank == 0 else "other") for rank in range(len(measured))]
        pred = max(preds)
        ratios = [m / p for m, p in zip(measured, preds, strict=True)]
        worst = max(worst, *(abs(r - 1) for r in ratios))
        c = plan.train
        states = c["weights"] + c["gradients"] + c["optimizer"] + c.get("lora", 0)
        lines.append(
            f"| {model} | {strategy} | {method} | {pred / gib:.2f} GiB | "
            f"{', '.join(f'{m / gib:.2f}' for m in measured)} GiB | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | {c['runtime'] / gib:.2f} GiB | {states / gib:.2f} GiB | "
            f"{c['activations'] / gib:.2f} GiB |")
    lines.append("")
    lines.append(f"Largest deviation: {worst * 100:.1f}% of the prediction.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "plan_cpu.json")
    parser.add_argument("--storage", type=Path, default=Path("/tmp/distft-bench-plan"))
    parser.add_argument("--gsm8k", default=os.environ.get("GSM8K_DIR", str(REPO.parent / "shared" / "data" / "gsm8k")))
    parser.add_argument("--only", nargs="*", help="run only cells whose model/strategy/method contains one of these")
    parser.add_argument("--baseline", action="store_true", help="measure the runtime baseline of a worker")
    parser.add_argument("--report", type=Path, help="print the markdown table for a results file")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
    elif args.baseline:
        measure_baseline(args.out)
    else:
        run_all(args.out, args.storage, args.gsm8k, args.only)


if __name__ == "__main__":
    main()
