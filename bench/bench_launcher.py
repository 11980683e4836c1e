"""Ray launcher overhead: `python -m distft.train` against the same per-worker recipe under `torchrun` (CPU).

Both run the same work — distft's recipe (`distft.recipe.run_training`: load, data, 16 LoRA steps, checkpoint, export
and its reload check) on SmolLM2-135M with 2 CPU processes of 1 thread each, gloo — once through distft's whole
command (config validation, the planner, the data precheck, a local Ray cluster, Ray Train's controller and
workers, summary.json) and once as `torchrun --nproc_per_node 2` processes that compose the same config and call the
recipe directly: plain torch.distributed, no Ray. The end-to-end wall time of each command is the figure (Ray's own
release gate for Ray Train vs torchrun is 1.15x); runs alternate (A B B A ...) so a drift in the machine's speed
falls on both. Step times come from each run's metrics.jsonl, so the loop's share and the launcher's share separate.

    python bench/bench_launcher.py --repeats 2 --out bench/results/launcher_cpu.json   # ~10 min on 2 idle cores
    python bench/bench_launcher.py --report bench/results/launcher_cpu.json
    python bench/bench_launcher.py --dry-run --out /tmp/launcher.json                  # tiny random Llama, 3 steps

    git worktree add /tmp/distft-before <commit>      # a third launcher: distft's command at an older commit
    python bench/bench_launcher.py --before /tmp/distft-before --repeats 2 --out bench/results/launcher_cpu_X.json

`--torchrun-worker` is the per-process entry torchrun starts (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench_peers' process sampler


def overrides(*, model: str, steps: int, data: str, storage: Path, name: str) -> list[str]:
    return ["+experiment=gsm8k_lora", f"model={model}", "hardware=cpu", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", f"data.path={data}", f"trainer.max_steps={steps}",
            "trainer.checkpoint_every=100000", "trainer.progress_bar=false", "eval.enabled=false",
            "eval.at_start=false", "logger=none", f"run.storage_path={storage}", f"run.name={name}"]


def torchrun_worker(over: list[str]) -> None:
    """One torchrun process: the config composed as `distft.train` composes it, then the recipe, no Ray."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from distft.config import compose, validate_config
    from distft.model import resolve_model_dir
    from distft.recipe import WorkerContext, run_training

    cfg = compose(over)
    validate_config(cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    run_dir = Path(cfg.run.storage_path) / cfg.run.name / (f"rank{rank}" if rank else "")
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=model_dir, rank=rank, world=world,
                                             device=torch.device("cpu")))
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", **result}, default=str))
    dist.destroy_process_group()


def run_once(kind: str, args, work: Path, index: int) -> dict:
    name = f"{kind}-{index}"
    over = overrides(model=args.model, steps=args.steps, data=args.data, storage=work, name=name)
    # Ray gives each worker OMP_NUM_THREADS = its CPUs; torchrun's processes get the same
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cwd = REPO
    if kind == "distft-before":  # the older checkout's package and configs, in the driver and Ray's workers
        cwd = args.before.resolve()
        env["PYTHONPATH"] = str(cwd)
    if kind.startswith("distft"):
        cmd = [sys.executable, "-m", "distft.train", *over]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "--torchrun-worker", "--", *over]
    from bench_peers import Watcher

    started = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        # every 2 s: each sample reads ~15 processes, and the sampler shares the 2 cores with the run
        watch = Watcher(proc.pid, work / name / "metrics.jsonl", every=2.0, role=process_role)
        for line in proc.stdout:  # seconds since launch on every line: the log is the start-up timeline
            log.write(f"{time.perf_counter() - started:7.1f} {line}")
        code = proc.wait()
        watch.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{kind} run {index} exited with {code}; see {work / (name + '.log')}")
    from distft.tracking import read_metrics

    rows = read_metrics(work / name / "metrics.jsonl")
    steps = [r["step_seconds"] for r in rows]
    summary = json.loads((work / name / "summary.json").read_text())
    return {"kind": kind, "index": index, "wall_seconds": round(wall, 2), "command": cmd,
            "loop_seconds": round(sum(steps), 2), "first_step_seconds": round(steps[0], 2),
            "steady_step_seconds": statistics.median(steps[1:] or steps),
            "outside_loop_seconds": round(wall - sum(steps), 2), "losses": [r["loss"] for r in rows],
            "status": summary.get("status"), "load_before": os.getloadavg()[0],
            "steady_cpu_cores": steady_cpu(watch), "startup_cpu": startup_cpu(watch, steps[0]),
            "rss_by_role": watch.rss()}


def process_role(proc, root_pid: int) -> str | None:
    """bench_peers' roles, with torchrun's workers named as Ray's are (both run the recipe)."""
    from bench_peers import role

    try:
        if "--torchrun-worker" in proc.cmdline():
            return "train_worker"
    except Exception:  # noqa: BLE001 - gone or unreadable
        return None
    return role(proc, root_pid)


def steady_cpu(watch) -> dict:
    """Cores used per role between the second step written and the last (1.0 = one core busy), and the window.
    On 2 cores whatever the other processes use is taken from the two ranks, which wait for each other."""
    window = watch.window(warmup=1)
    if window is None:
        return {}
    by_role = watch.cpu_share(*window)
    workers = by_role.get("train_worker", 0.0)
    return {"seconds": round(window[1] - window[0], 1), "train_workers": round(workers, 3),
            "everything_else": round(sum(by_role.values()) - workers, 3), "by_role": by_role}


def startup_cpu(watch, first_step_seconds: float) -> dict:
    """Core-seconds each role used before the first step began: the part of the time outside the steps that is CPU
    work, by process. The first step began when its metrics line was first seen less its own duration; each process
    counts up to its last sample before that (every 2 s, so a process's last ~2 s of start-up can be missed, and
    one that started and exited between two samples is not seen)."""
    first_seen = next((t for t, n in watch.steps if n >= 1), None)
    if first_seen is None:
        return {}
    cutoff = first_seen - first_step_seconds
    by_role: dict[str, float] = {}
    for entry in watch.procs.values():
        before = [c for t, c in entry["samples"] if t <= cutoff]
        if before:
            name = entry["role"] or "ray:worker_starting"
            by_role[name] = by_role.get(name, 0.0) + before[-1]
    workers, main = by_role.get("train_worker", 0.0), by_role.get("main", 0.0)
    return {"seconds": round(cutoff - watch.steps[0][0], 1), "all": round(sum(by_role.values()), 1),
            "train_workers": round(workers, 1), "main": round(main, 1),
            "everything_else": round(sum(by_role.values()) - workers - main, 1),
            "by_role": {k: round(v, 2) for k, v in sorted(by_role.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--data", default=os.environ.get("GSM8K_DIR", str(REPO.parent / "shared/data/gsm8k")))
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--report", metavar="JSON")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--before", type=Path, help="an older distft checkout: its command is a third launcher")
    p.add_argument("--torchrun-worker", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.torchrun_worker:
        torchrun_worker([a for a in args.rest if a != "--"])
        return 0
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return 0
    if args.dry_run:
        args.model, args.steps, args.repeats = "tiny_llama", 3, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_launcher-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    kinds = ["distft", "torchrun"] + (["distft-before"] if args.before else [])
    for i in range(args.repeats):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            runs.append(run_once(kind, args, work, i))
            print(f"[bench_launcher] {kind} #{i}: {runs[-1]['wall_seconds']:.1f} s", flush=True)
    report = {"steps": args.steps, "model": args.model, "runs": runs, "started": time.strftime("%F %T")}
    for kind in kinds:
        losses = {json.dumps(r["losses"]) for r in runs if r["kind"] == kind}
        report[f"{kind}_same_losses_every_run"] = len(losses) == 1
    report["same_losses_both"] = ({json.dumps(r["losses"]) for r in runs if r["kind"] == "distft"}
                                  == {json.dumps(r["losses"]) for r in runs if r["kind"] == "torchrun"})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    """Every run, then medians and the fastest run of each launcher (with two runs a median is their mean, so one
    disturbed run moves it; the fastest run is the robust figure)."""
    runs = report["runs"]
    lines = [f"{report['steps']} steps of {report['model']}, 2 processes", "",
             "| run | launcher | wall s | the steps, s | first step s | steady step s | outside the steps, s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        first = f"{r['first_step_seconds']:.1f}" if "first_step_seconds" in r else "n/a"
        lines.append(f"| {r['index']} | {r['kind']} | {r['wall_seconds']:.1f} | {r['loop_seconds']:.1f} | {first} | "
                     f"{r['steady_step_seconds']:.2f} | {r['outside_loop_seconds']:.1f} |")
    before = any(r["kind"] == "distft-before" for r in runs)
    lines += ["", "| | distft (Ray) | torchrun | ratio |" + (" distft before | its ratio |" if before else ""),
              "|---|---|---|---|" + ("---|---|" if before else "")]
    for key, label in (("wall_seconds", "end-to-end wall s"), ("loop_seconds", "the steps, s"),
                       ("steady_step_seconds", "steady step s"), ("outside_loop_seconds", "outside the steps, s")):
        for pick, name in ((statistics.median, "median"), (min, "fastest run")):
            a = pick(r[key] for r in runs if r["kind"] == "distft")
            b = pick(r[key] for r in runs if r["kind"] == "torchrun")
            row = f"| {label} ({name}) | {a:.2f} | {b:.2f} | {a / b:.3f}x |"
            if before:
                c = pick(r[key] for r in runs if r["kind"] == "distft-before")
                row += f" {c:.2f} | {c / b:.3f}x |"
            lines.append(row)
    cpu = [r for r in runs if r.get("steady_cpu_cores")]
    if cpu:
        lines += ["", "Cores used during the steady steps (sampled every 2 s; 2 cores in all):", "",
                  "| run | launcher | the 2 training processes | every other process of the command |",
                  "|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['kind']} | {r['steady_cpu_cores']['train_workers']:.2f} | "
                  f"{r['steady_cpu_cores']['everything_else']:.3f} |" for r in cpu]
    start = [r for r in runs if r.get("startup_cpu")]
    if start:
        lines += ["", "CPU before the first step (core-seconds; sampled every 2 s):", "",
                  "| run | launcher | seconds | all processes | the 2 training processes | the command's own process "
                  "| every other process |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['kind']} | {c['seconds']:.1f} | {c['all']:.1f} | {c['train_workers']:.1f} | "
                  f"{c['main']:.1f} | {c['everything_else']:.1f} |" for r in start for c in [r["startup_cpu"]]]
    lines.append(f"\nsame loss curve under both launchers: {report['same_losses_both']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
