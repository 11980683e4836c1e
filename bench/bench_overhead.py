"""Framework overhead and padding on CPU, measured in one run.

1. Step time: `distft.recipe.run_training` (the real per-worker loop, in-process, one worker, no Ray) against a
   hand-written PyTorch loop on the same model (SmolLM2-135M + LoRA, same seed), the same micro-batches and the same
   optimizer. Both run in this process, interleaved step by step (framework step k, plain step k, ...; the order
   within a step alternates across repeats), so a busy shared CPU slows both alike. The first `--warmup` optimizer
   steps of each are left out; the figures are medians of the rest and the ratio framework / plain. Both loops must
   log the same losses (same model, same batches, same dropout stream): a check that they compute the same thing.
2. Padding: the share of non-padding token slots on GSM8K train at `--seq-len` with our packing, with every example
   padded to `--seq-len`, and with dynamic padding to the longest example of a shuffled micro-batch of 4.

    python bench/bench_overhead.py --steps 8 --repeats 2 --out bench/results/overhead_cpu.json
    python bench/bench_overhead.py --report bench/results/overhead_cpu.json   # tables of a recorded run

Prints Markdown tables and writes every per-step time to the JSON file.
"""

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import distft.recipe as recipe  # noqa: E402
from distft.config import compose  # noqa: E402
from distft.data import ShardedBatches, build_rows  # noqa: E402
from distft.methods import apply_method  # noqa: E402
from distft.model import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from distft.recipe import RunHooks, WorkerContext, run_training  # noqa: E402
from distft.tracking import MetricsFile  # noqa: E402

THREADS = 2  # the machine: 2 cores; the framework gets the same via scaling.cpus_per_worker


def compose_cfg(*, data_path: str, steps: int, micro: int, global_batch: int, seq_len: int, lr: float):
    """The framework's config for this bench, composed exactly as `python -m distft.train` would compose it."""
    overrides = [
        "+experiment=gsm8k_lora",
        "model=smollm2_135m",
        "hardware=cpu",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={THREADS}",
        f"data.path={data_path}",
        f"data.seq_len={seq_len}",
        "eval.enabled=false",
        "eval.at_start=false",
        "run.export=false",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every=100000",  # only the final save, which runs after the last step's timer
        "trainer.log_every=1",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={micro}",
        f"trainer.global_batch_size={global_batch}",
        f"trainer.lr={lr}",
        # A constant learning rate, so that the plain loop (no scheduler) follows the same loss curve step for step.
        "trainer.lr_schedule=constant",
        "trainer.warmup_steps=0",
    ]
    return compose(overrides)


class PlainLoop:
    """A hand-written loop: forward → summed CE on shifted labels / answer tokens → backward → clip → AdamW.

    Model, LoRA init, rows, batch order, dropout seed and optimizer follow the framework's recipe, so both loops
    compute the same updates; nothing else of the framework is used. It keeps its own RNG state, so that its steps can
    run between the framework's steps without either taking the other's dropout masks.
    """

    def __init__(self, cfg, model_dir: str):
        trainer, method = cfg.trainer, cfg.method
        torch.set_num_threads(THREADS)
        # The framework turns this on for CPU runs; the same setting keeps the comparison about the loop alone.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(trainer.seed)
        tokenizer = load_tokenizer(model_dir)
        model = load_model(
            model_dir,
            dtype="fp32",
            device=torch.device("cpu"),
            attn_implementation=cfg.model.attn_implementation,
        )
        self.model = apply_method(
            model,
            name=method.name,
            lora_r=method.lora_r,
            lora_alpha=method.lora_alpha,
            lora_dropout=method.lora_dropout,
            target_modules=list(method.target_modules),
        )
        template = cfg.data.template if cfg.model.chat_template else "plain"
        rows, _ = build_rows(
            name=cfg.data.name,
            path=cfg.data.path,
            split="train",
            tokenizer=tokenizer,
            template=template,
            seq_len=cfg.data.seq_len,
            packing=cfg.data.packing,
            system_prompt=cfg.data.system_prompt,
        )
        batches = ShardedBatches(
            rows,
            micro_batch_size=trainer.micro_batch_size,
            rank=0,
            world_size=1,
            seed=trainer.seed,
            shuffle=True,
            pad_id=tokenizer.pad_token_id,
        )
        self.stream = batches.forever()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=trainer.lr,
            betas=tuple(trainer.betas),
            eps=trainer.eps,
            weight_decay=trainer.weight_decay,
        )
        self.accum = trainer.global_batch_size // trainer.micro_batch_size
        self.max_grad_norm = trainer.max_grad_norm
        torch.manual_seed(trainer.seed + 1000)  # the framework's dropout stream for rank 0
        self.rng = torch.get_rng_state()
        self.model.train()
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        t0, c0 = time.perf_counter(), time.process_time()

        micro = [next(self.stream) for _ in range(self.accum)]
        n_tokens = sum(b["num_loss_tokens"] for b in micro)
        loss_sum = 0.0
        for b in micro:
            logits = self.model(
                input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
            ).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                b["labels"][:, 1:].flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            (loss * (1.0 / n_tokens)).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.seconds.append(time.perf_counter() - t0)
        self.cpu_seconds.append(time.process_time() - c0)
        self.losses.append(loss_sum / n_tokens)
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)


class _HookedMetrics(MetricsFile):
    """metrics.jsonl writer that notes the time around each row and runs `after_row` (one plain step) once the row
    is written. The framework's `step_seconds` timer has stopped by then, and the iteration gaps leave the hook out."""

    after_row = None
    stamps: list[dict] = []

    def log(self, row: dict) -> None:
        stamp = {"wall_in": time.perf_counter(), "cpu_in": time.process_time()}
        super().log(row)
        stamp["wall_written"], stamp["cpu_written"] = time.perf_counter(), time.process_time()
        if _HookedMetrics.after_row is not None:
            _HookedMetrics.after_row()
        stamp["wall_out"], stamp["cpu_out"] = time.perf_counter(), time.process_time()
        _HookedMetrics.stamps.append(stamp)


def run_interleaved(cfg, model_dir: str, plain_first: bool) -> dict:
    """Run the framework loop and the plain loop step by step in turn: F1 P1 F2 P2 … or P1 F1 P2 F2 …

    Both see the same machine at nearly the same moment, which matters on a shared CPU. The framework runs its real
    loop (`run_training`); a plain step runs from its metrics hook, after the framework's step timer has stopped.
    """
    steps = cfg.trainer.max_steps
    plain = PlainLoop(cfg, model_dir)
    if plain_first:
        plain.step()

    def after_row():
        if len(plain.seconds) < steps:
            plain.step()

    _HookedMetrics.stamps, _HookedMetrics.after_row = [], after_row
    original = recipe.MetricsFile  # the name the recipe's tracker is built with
    recipe.MetricsFile = _HookedMetrics
    try:
        with tempfile.TemporaryDirectory(prefix="distft-bench-") as tmp:
            run_dir = Path(tmp)
            result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=model_dir), RunHooks())
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        recipe.MetricsFile = original
        _HookedMetrics.after_row = None
    assert len(plain.seconds) == len(rows) == steps, (len(plain.seconds), len(rows), steps)
    st = _HookedMetrics.stamps
    # Iteration k (k >= 2): from the end of the previous hook to the written row of step k, i.e. everything the
    # framework's loop did for step k, the metrics row included, and nothing of the plain loop.
    iteration = [b["wall_written"] - a["wall_out"] for a, b in zip(st, st[1:], strict=False)]
    iteration_cpu = [b["cpu_written"] - a["cpu_out"] for a, b in zip(st, st[1:], strict=False)]
    framework = {
        "step_seconds": [r["step_seconds"] for r in rows],
        "iteration_seconds": iteration,
        "iteration_cpu_seconds": iteration_cpu,
        "loss": [r["loss"] for r in rows],
        "grad_accum": result["grad_accum"],
        "data": result["data"],
    }
    return {
        "framework": framework,
        "plain": {"step_seconds": plain.seconds, "cpu_seconds": plain.cpu_seconds, "loss": plain.losses},
    }


def padding_shares(model_dir: str, *, data_path: str, seq_len: int, dynamic_batch: int, seeds: int) -> dict:
    """Share of non-padding token slots on GSM8K train, three ways (prompt and answer tokens both count as real)."""
    tokenizer = load_tokenizer(model_dir)
    kwargs = dict(
        name="gsm8k", path=data_path, split="train", tokenizer=tokenizer, template="auto", seq_len=seq_len
    )
    packed_rows, packed = build_rows(packing=True, **kwargs)
    rows, unpacked = build_rows(packing=False, **kwargs)
    lengths = [len(r.input_ids) for r in rows]
    real = sum(lengths)
    # Dynamic padding: shuffled micro-batches of `dynamic_batch`, each padded to its longest row (what a
    # collator with padding="longest" does). Averaged over a few shuffles; the spread is tiny.
    dynamic = []
    for epoch in range(seeds):
        loader = ShardedBatches(
            rows, micro_batch_size=dynamic_batch, rank=0, world_size=1, seed=42, shuffle=True
        )
        order = loader.shard(epoch)
        slots = sum(
            dynamic_batch * max(lengths[j] for j in order[i : i + dynamic_batch])
            for i in range(0, len(order), dynamic_batch)
        )
        dynamic.append(real / slots)
    return {
        "seq_len": seq_len,
        "examples": packed["examples"],
        "dropped_too_long": packed["dropped_too_long"],
        "kept_examples": len(rows),
        "real_tokens": real,
        "mean_example_tokens": real / len(rows),
        "packed": {"rows": len(packed_rows), "non_padding_share": packed["non_padding_fraction"]},
        "pad_to_seq_len": {
            "rows": len(rows),
            "non_padding_share": real / (len(rows) * seq_len),
            "build_rows_stat": unpacked["non_padding_fraction"],
        },
        "dynamic": {
            "micro_batch_size": dynamic_batch,
            "shuffles": seeds,
            "non_padding_share": statistics.mean(dynamic),
            "per_shuffle": dynamic,
        },
    }


def paired_summary(pairs: list[dict], resamples: int = 10_000) -> dict:
    """Per-step ratios of all repeats pooled: median, mean, and a percentile-bootstrap 95% interval of the mean
    (fixed seed, so the same result file always gives the same interval)."""
    ratios = [x for p in pairs for x in p["paired_step_ratios"]]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {
        "n": len(ratios),
        "median": statistics.median(ratios),
        "mean": statistics.mean(ratios),
        "mean_ci95": [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]],
        "min": min(ratios),
        "max": max(ratios),
    }


def summarise(times: list[float], warmup: int) -> dict:
    steady = times[warmup:]
    return {"median": statistics.median(steady), "min": min(steady), "max": max(steady), "n": len(steady)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_summary(loads: list[float]) -> dict:
    if not loads:
        return {"mean": None, "max": None}
    return {"mean": round(statistics.mean(loads), 2), "max": round(max(loads), 2)}


def sample_load(samples: list, every: float = 10.0) -> threading.Event:
    """Note the 1-minute load average every `every` seconds until the returned event is set (timings on a busy
    machine are not comparable, so the result file says how busy it was)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            samples.append((time.perf_counter(), os.getloadavg()[0]))

    threading.Thread(target=loop, daemon=True).start()
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=8, help="measured optimizer steps per loop (after warm-up)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="optimizer steps left out at the start of each loop"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="interleaved runs; odd repeats start each step with the framework",
    )
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--data",
        default=os.environ.get("GSM8K_DIR", "/work/shared/data/gsm8k"),
        help="directory with GSM8K train.jsonl/test.jsonl",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overhead_cpu.json")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: print the tables of an earlier result file (and fill in derived figures)",
    )
    args = parser.parse_args()
    if args.report:
        result = json.loads(args.report.read_text())
        result["paired_all"] = paired_summary(result["pairs"])
        print(markdown(result))
        return

    logging.basicConfig(level=logging.WARNING)  # set first, so the recipe's INFO basicConfig is a no-op
    torch.set_num_threads(THREADS)
    model_dir = resolve_model_dir(source="embedded", path=None)
    cfg = compose_cfg(
        data_path=args.data,
        steps=args.warmup + args.steps,
        micro=args.micro_batch,
        global_batch=args.global_batch,
        seq_len=args.seq_len,
        lr=args.lr,
    )
    load_before = load_average()
    load_samples: list[tuple[float, float]] = []  # (perf_counter, 1-minute load average)
    stop_sampling = sample_load(load_samples)
    started = time.perf_counter()

    pairs = []
    for r in range(args.repeats):
        plain_first = r % 2 == 1
        t_start = time.perf_counter()
        run = run_interleaved(cfg, model_dir, plain_first=plain_first)
        during = [load for t, load in load_samples if t >= t_start]
        fw, pl = run["framework"], run["plain"]
        w = args.warmup
        fw_sum, pl_sum = summarise(fw["step_seconds"], w), summarise(pl["step_seconds"], w)
        it_sum = summarise(fw["iteration_seconds"], w - 1)  # iteration gaps start at step 2
        # Process CPU seconds (all threads) are less disturbed than wall time when other jobs share the cores.
        it_cpu, pl_cpu = summarise(fw["iteration_cpu_seconds"], w - 1), summarise(pl["cpu_seconds"], w)
        paired = [a / b for a, b in zip(fw["step_seconds"][w:], pl["step_seconds"][w:], strict=True)]
        pairs.append(
            {
                "order": "plain, framework" if plain_first else "framework, plain",
                "load_1min": load_summary(during),
                "framework": {
                    **fw,
                    "summary": fw_sum,
                    "iteration_summary": it_sum,
                    "iteration_cpu_summary": it_cpu,
                },
                "plain": {**pl, "summary": pl_sum, "cpu_summary": pl_cpu},
                "ratio_step": fw_sum["median"] / pl_sum["median"],
                "paired_step_ratios": paired,
                "ratio_paired_median": statistics.median(paired),
                "ratio_iteration": it_sum["median"] / pl_sum["median"],
                "ratio_iteration_cpu": it_cpu["median"] / pl_cpu["median"],
                "loss_step1": {"framework": fw["loss"][0], "plain": pl["loss"][0]},
                "max_abs_loss_diff": max(abs(a - b) for a, b in zip(fw["loss"], pl["loss"], strict=True)),
            }
        )
        print(
            f"repeat {r + 1}: plain {pl_sum['median']:.3f} s, framework {fw_sum['median']:.3f} s, "
            f"ratio {pairs[-1]['ratio_step']:.3f}",
            file=sys.stderr,
        )

    stop_sampling.set()
    padding = padding_shares(model_dir, data_path=args.data, seq_len=args.seq_len, dynamic_batch=4, seeds=5)
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": THREADS,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": cpu_model(),
            "load_average_before": load_before,
            "load_1min_during_timing": {
                **load_summary([load for _, load in load_samples]),
                "samples": [round(load, 2) for _, load in load_samples],
            },
            "load_average_after": load_average(),
        },
        "setup": {
            "model": "SmolLM2-135M-Instruct (embedded), fp32",
            "method": "lora r=16 all-linear",
            "micro_batch": args.micro_batch,
            "global_batch": args.global_batch,
            "grad_accum": pairs[0]["framework"]["grad_accum"],
            "seq_len": args.seq_len,
            "packing": True,
            "warmup_steps_excluded": args.warmup,
            "measured_steps": args.steps,
            "lr": args.lr,
        },
        "pairs": pairs,
        "ratio_step_median_of_repeats": statistics.median(p["ratio_step"] for p in pairs),
        "ratio_paired_median_all": statistics.median(x for p in pairs for x in p["paired_step_ratios"]),
        "paired_all": paired_summary(pairs),
        "padding": padding,
        "bench_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"{m['cpus']} CPUs ({m['processor']}), {m['threads']} threads per loop, torch {m['torch']}; 1-minute load "
        f"average during timing: mean {m['load_1min_during_timing']['mean']}, max "
        f"{m['load_1min_during_timing']['max']} (the bench itself accounts for about {m['threads']})",
        "",
        "| repeat | order in each step | load (1-min, mean / max) | plain step (s) | framework step (s) | ratio of medians | "
        "median of per-step ratios | framework iteration (s) | ratio | CPU-time ratio | loss step 1 "
        "(framework / plain) | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(res["pairs"], 1):
        fw, pl = p["framework"], p["plain"]
        lines.append(
            f"| {i} | {p['order']} | {p['load_1min']['mean']} / {p['load_1min']['max']} | {pl['summary']['median']:.3f} | {fw['summary']['median']:.3f} | "
            f"{p['ratio_step']:.3f}× | {p['ratio_paired_median']:.3f}× | {fw['iteration_summary']['median']:.3f} | "
            f"{p['ratio_iteration']:.3f}× | {p['ratio_iteration_cpu']:.3f}× | "
            f"{p['loss_step1']['framework']:.6f} / {p['loss_step1']['plain']:.6f} | {p['max_abs_loss_diff']:.1e} |"
        )
    a = res["paired_all"]
    lines += [
        "",
        f"All {a['n']} measured steps, framework step / plain step of the same step: median {a['median']:.3f}×, "
        f"mean {a['mean']:.3f}× (95% bootstrap interval of the mean {a['mean_ci95'][0]:.3f}–{a['mean_ci95'][1]:.3f}×), "
        f"range {a['min']:.3f}–{a['max']:.3f}×",
    ]
    pad = res["padding"]
    lines += [
        "",
        f"GSM8K train, seq_len {pad['seq_len']}: {pad['kept_examples']} examples "
        f"({pad['dropped_too_long']} longer than seq_len dropped), mean {pad['mean_example_tokens']:.1f} tokens",
        "",
        "| batching | rows | non-padding share |",
        "|---|---|---|",
        f"| packed (distft, best-fit decreasing) | {pad['packed']['rows']} | "
        f"{pad['packed']['non_padding_share']:.1%} |",
        f"| one example per row, padded to {pad['seq_len']} | {pad['pad_to_seq_len']['rows']} | "
        f"{pad['pad_to_seq_len']['non_padding_share']:.1%} |",
        f"| dynamic padding, shuffled micro-batches of {pad['dynamic']['micro_batch_size']} "
        f"(mean of {pad['dynamic']['shuffles']} shuffles) | {pad['pad_to_seq_len']['rows']} | "
        f"{pad['dynamic']['non_padding_share']:.1%} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
