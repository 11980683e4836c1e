"""The GPU check: one prepared command for a short GPU slot (under 8 minutes on one H100/H200) that writes one JSON
and a log. It runs distft's per-worker recipe (`distft.recipe.run_training`) without Ray — world size 1 on a one-rank
process group — on random-initialised Llama shapes, so it needs no weights, no hub and no Ray:

  matrix   every strategy that runs on one GPU (ddp, fsdp; zero2 and zero3 when deepspeed imports) x full, LoRA and
           QLoRA (when bitsandbytes imports): a few bf16 steps each, the export reloaded and its logits compared;
           each run's measured peak memory beside the planner's prediction.
  mfu      full fine-tuning of TinyLlama-1.1B's shape at seq 2048: model FLOPs per token (the planner's count) x
           steady tokens/s / the GPU's peak bf16 FLOP/s (`hardware.peak_tflops`).
  lora7b   LoRA r=16 on Llama-2-7B's shape: distft's steady tokens/s against HF `Trainer` + peft on the same packed
           rows, batch, optimizer and schedule, in the same process.
  qlora7b  QLoRA on Llama-2-7B's shape: measured peak memory against the planner's prediction.

    python bench/gpu_check.py --prepare .gpu_check         # here (network): tokenizer, data subset, wheels
    bash bench/gpu_check.sh                                # on the GPU box: installs the wheels, runs the check
    python bench/gpu_check.py --dry-run --out /tmp/gc      # CPU, tiny shapes, fp32, 2 steps: CI runs this

`--only matrix,mfu` runs some parts. Every part records its command-line overrides; a part that fails records its
error and the others still run. Results: `<out>/gpu_check.json`, log: `<out>/gpu_check.log`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_memory import HostSampler  # noqa: E402  (stdlib only at import)

PARTS = ("matrix", "mfu", "lora7b", "qlora7b")
# model.* overrides of a random-initialised Llama (model=tiny_llama carries source=random)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4),  # TinyLlama
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),  # Llama-2
}
# What each part runs on a GPU, and in --dry-run on CPU (tiny shapes, fp32, 2 steps: the same code, minutes less).
GPU = {"matrix": ("small", 512, 4, 4), "mfu": ("1b", 2048, 4, 12), "lora7b": ("7b", 2048, 2, 10),
       "qlora7b": ("7b", 2048, 2, 4)}  # (shape, seq_len, micro_batch_size, steps)
DRY = {part: ("tiny", 256, 2, 3) for part in PARTS}
# --dry-run's matrix: each method once and each engine once (the same code as the 12 cells; --full-matrix runs all)
DRY_MATRIX = (("ddp", "full"), ("ddp", "lora"), ("ddp", "qlora"), ("fsdp", "lora"), ("zero3", "lora"))
WARMUP = 2  # steps left out of the steady-state figures (CUDA graphs of the allocator, autotuning)

log = logging.getLogger("gpu_check")


# --- the one-rank process group and the recipe ------------------------------------------------------------------


def init_process_group(gpu: bool) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed reads the launcher's variables even when the process group exists
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if gpu:
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # gloo beside NCCL: FSDP's CPU offload and object collectives use CPU tensors
    dist.init_process_group("cuda:nccl,cpu:gloo" if gpu else "gloo", rank=0, world_size=1)


def overrides(*, method: str, strategy: str, shape: str, seq_len: int, micro: int, steps: int, gpu: bool,
              data: Path, tokenizer: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """The command-line overrides of one run: `python -m distft.train OVERRIDES` would run the same config."""
    out = [f"+experiment=gsm8k_{method}", "model=tiny_llama", f"model.name=random_{shape}", f"strategy={strategy}",
           "hardware=gpu_1x" if gpu else "hardware=cpu", *(f"model.{k}={v}" for k, v in SHAPES[shape].items()),
           f"data.path={data}", f"data.seq_len={seq_len}", f"data.max_train_examples={2000 if gpu else 200}",
           f"trainer.max_steps={steps}", f"trainer.micro_batch_size={micro}", f"trainer.global_batch_size={micro}",
           "trainer.warmup_steps=0", "trainer.checkpoint_every=100000", "trainer.progress_bar=false",
           "scaling.num_workers=1", "eval.enabled=false", "logger=none"]
    if tokenizer:
        out.append(f"model.tokenizer={tokenizer}")
    return [*out, *extra]


def run_recipe(over: list[str], root: Path, name: str, gpu: bool) -> dict:
    """One run of the per-worker recipe at world size 1; its result, the planner's prediction and the metrics."""
    import torch
    from omegaconf import OmegaConf

    from distft.config import compose, validate_config
    from distft.model import resolve_model_dir
    from distft.plan import plan_config
    from distft.recipe import WorkerContext, run_training
    from distft.tracking import read_metrics

    cfg = compose(over)
    validate_config(cfg)
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    plan = plan_config(cfg, model_dir=model_dir)
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    with HostSampler() as host:
        result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=model_dir, device=device))
    rows = read_metrics(run_dir / "metrics.jsonl")
    steady = rows[WARMUP:] or rows
    tokens = sum(r["tokens_per_second"] * r["step_seconds"] for r in steady)
    return {
        "overrides": over, "seconds": round(time.time() - started, 1), "steps": result["steps"],
        "losses": [r["loss"] for r in rows], "finite": all(r["loss"] == r["loss"] for r in rows),
        "steady_tokens_per_second": tokens / sum(r["step_seconds"] for r in steady),
        "steady_step_seconds": statistics.median(r["step_seconds"] for r in steady),
        "tokens_per_step": rows[-1]["tokens_per_second"] * rows[-1]["step_seconds"],
        "peak_memory_bytes": result["peak_memory_bytes"],
        "peak_memory_bytes_by_phase": result["peak_memory_bytes_by_phase"],
        "planned_peak_bytes": plan.peak_bytes, "planned_peak_by_phase": plan.memory.phases,
        "planned_vs_measured": plan.peak_bytes / result["peak_memory_bytes"],
        "flops_per_token": plan.flops_per_token, "peak_tflops": cfg.hardware.peak_tflops,
        "export_check": result["export_check"], "trainable_params": result["trainable_params"],
        "total_params": result["total_params"], "model_dir": model_dir,
        # host memory of this process over the whole run (load included) beside the planner's host RAM at load
        # (one worker here): on a GPU the weights go tensor by tensor onto the device (device_map); the file pages
        # the loader maps are RssFile (page cache), the tensors in flight RssAnon above the runtime's
        "host": {"anon_before": host.before["RssAnon"], "anon_peak": host.peak["RssAnon"],
                 "file_peak": host.peak["RssFile"], "planned_load": plan.memory.host_per_node_load},
    }


# --- the parts --------------------------------------------------------------------------------------------------


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def part_overrides(ctx: dict, part: str, *, method: str, strategy: str = "ddp", extra: tuple[str, ...] = ()) -> list[str]:
    """The overrides of one run of `part`, at the part's shape, sequence length, micro-batch and steps."""
    shape, seq_len, micro, steps = ctx["sizes"][part]
    return overrides(method=method, strategy=strategy, shape=shape, seq_len=seq_len, micro=micro, steps=steps,
                     extra=extra, **ctx["common"])


def part_matrix(ctx: dict) -> dict:
    strategies = ["ddp", "fsdp"] + (["zero2", "zero3"] if available("deepspeed") else [])
    methods = ["full", "lora"] + (["qlora"] if available("bitsandbytes") else [])
    out = {"skipped": ([] if available("deepspeed") else ["zero2, zero3: deepspeed does not import"]) +
           ([] if available("bitsandbytes") else ["qlora: bitsandbytes does not import"])}
    cells = [(s, m) for s in strategies for m in methods]
    if not ctx["gpu"] and not ctx["full_matrix"]:
        cells = [c for c in cells if c in DRY_MATRIX]
    for strategy, method in cells:
        name = f"{strategy}-{method}"
        # FSDP2 shards 4-bit weights stored in the compute dtype (GPU_REVIEW #3)
        extra = ("method.quant_storage=bf16",) if method == "qlora" and strategy == "fsdp" and ctx["gpu"] else ()
        over = part_overrides(ctx, "matrix", method=method, strategy=strategy, extra=extra)
        out[name] = guarded(lambda over=over, name=name: run_recipe(over, ctx["root"], name, ctx["gpu"]))
    return out


def part_mfu(ctx: dict) -> dict:
    over = part_overrides(ctx, "mfu", method="full",
                          extra=("run.export=false", "trainer.gradient_checkpointing=false"))
    run = run_recipe(over, ctx["root"], "mfu", ctx["gpu"])
    peak = run["peak_tflops"]
    run["mfu"] = run["flops_per_token"] * run["steady_tokens_per_second"] / (peak * 1e12) if peak else None
    return run


def part_lora7b(ctx: dict) -> dict:
    over = part_overrides(ctx, "lora7b", method="lora", extra=("run.export=false", "trainer.lr_schedule=constant"))
    distft = run_recipe(over, ctx["root"], "lora7b", ctx["gpu"])
    hf = hf_trainer(over, distft["model_dir"], ctx["root"] / "lora7b-hf", ctx["gpu"], steps=ctx["sizes"]["lora7b"][3])
    return {"distft": distft, "hf_trainer_peft": hf,
            "distft_vs_hf": distft["steady_tokens_per_second"] / hf["steady_tokens_per_second"]}


def part_qlora7b(ctx: dict) -> dict:
    if not available("bitsandbytes"):
        return {"skipped": "bitsandbytes does not import"}
    over = part_overrides(ctx, "qlora7b", method="qlora", extra=("run.export=false",))
    return run_recipe(over, ctx["root"], "qlora7b", ctx["gpu"])


def hf_trainer(over: list[str], model_dir: str, out_dir: Path, gpu: bool, *, steps: int) -> dict:
    """HF `Trainer` + peft on the rows distft trained on (same packing, order aside), the same micro-batch, AdamW,
    learning rate and constant schedule, bf16 on GPU. Its step times come from a callback (synchronised on CUDA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from distft.config import compose
    from distft.model import load_tokenizer
    from distft.recipe import training_rows

    cfg = compose(over)
    tokenizer = load_tokenizer(model_dir)
    rows, _, _ = training_rows(cfg, tokenizer)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    m = cfg.method
    model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            r = rows[i]
            return {"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids}

    def collate(batch):  # packed rows share one length; position_ids keep the examples apart
        return {k: torch.tensor([b[k] for b in batch]) for k in batch[0]}

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    t = cfg.trainer
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.micro_batch_size, max_steps=steps,
        learning_rate=t.lr or m.default_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim="adamw_torch", bf16=gpu, use_cpu=not gpu, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0, seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate,
                      callbacks=[StepTimes()])
    trainer.train()
    tokens = t.micro_batch_size * cfg.data.seq_len
    steady = times[WARMUP:] or times
    peak = torch.cuda.max_memory_allocated() if gpu else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    return {"steps": len(times), "steady_step_seconds": statistics.median(steady),
            "steady_tokens_per_second": tokens * len(steady) / sum(steady), "peak_memory_bytes": peak,
            "losses": losses}


def guarded(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # a part that breaks is a finding, not the end of the check
        log.error("failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}


# --- preparing what travels to the GPU box ----------------------------------------------------------------------

WHEELS = ("hydra-core==1.3.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "bitsandbytes==0.50.2")


def prepare(out: Path, data: Path) -> None:
    """The tokenizer, a GSM8K subset and the wheels the GPU box lacks, under 64 MiB in all."""
    import subprocess

    from distft.model import _load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    _load_tokenizer("embedded").save_pretrained(out / "tokenizer")
    (out / "data").mkdir(exist_ok=True)
    for split, n in (("train", 2000), ("test", 64)):
        lines = (data / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(out / "wheels"),
                    "--only-binary=:all:", *[w for w in WHEELS if not w.startswith("antlr4")]], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(out / "wheels"),
                    *[w for w in WHEELS if w.startswith("antlr4")]], check=True)  # an sdist only
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


# --- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32 (what CI runs)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--data", type=Path, default=None, help="GSM8K train/test JSONL (default: $GSM8K_DIR or "
                        "../shared/data/gsm8k, or .gpu_check/data)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for the random models (default: "
                        ".gpu_check/tokenizer when present, else the embedded SmolLM2 tokenizer)")
    parser.add_argument("--prepare", type=Path, default=None, help="write what travels to the GPU box there, exit")
    parser.add_argument("--full-matrix", action="store_true", help="with --dry-run: all strategy x method cells")
    args = parser.parse_args(argv)

    data = args.data or next((p for p in (Path(os.environ.get("GSM8K_DIR", "/nonexistent")),
                                          REPO.parent / "shared" / "data" / "gsm8k", REPO / ".gpu_check" / "data")
                              if (p / "train.jsonl").exists()), None)
    if data is None:
        parser.error("no GSM8K data found: pass --data DIR (train.jsonl, test.jsonl)")
    if args.prepare:
        prepare(args.prepare, data)
        return 0
    parts = [p for p in args.only.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    import torch

    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU box, or --dry-run on CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        handlers=[logging.FileHandler(args.out / "gpu_check.log"), logging.StreamHandler()])
    tokenizer = args.tokenizer or (str(REPO / ".gpu_check" / "tokenizer")
                                   if (REPO / ".gpu_check" / "tokenizer").exists() else None)
    init_process_group(gpu)
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
              "device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "parts": {}}
    for module in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        report[module] = _version(module)
    ctx = {"gpu": gpu, "sizes": GPU if gpu else DRY, "full_matrix": args.full_matrix, "root": Path(tempfile.mkdtemp(prefix="gpu-check-")),
           "common": {"gpu": gpu, "data": data, "tokenizer": tokenizer}}
    functions = {"matrix": part_matrix, "mfu": part_mfu, "lora7b": part_lora7b, "qlora7b": part_qlora7b}
    for part in parts:
        started = time.time()
        log.info("part %s", part)
        report["parts"][part] = guarded(lambda part=part: functions[part](ctx))
        report["parts"][part]["part_seconds"] = round(time.time() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # whatever is done
    shutil.rmtree(ctx["root"], ignore_errors=True)
    print(summary_lines(report))
    return 0 if not failures(report) else 1


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or its import fails on this box
        return None


def failures(report: dict) -> list[str]:
    """Parts and matrix cells that raised, or whose loss was not finite, or whose export did not reload."""
    bad = []
    for part, result in report["parts"].items():
        cells = {k: v for k, v in result.items() if isinstance(v, dict)} if part == "matrix" else {part: result}
        for name, cell in cells.items():
            check = cell.get("export_check") or {}
            if "error" in cell or cell.get("finite") is False or check.get("ok") is False:
                bad.append(name)
    return bad


def summary_lines(report: dict) -> str:
    lines = [f"GPU check on {report['device']} (dry run: {report['dry_run']})"]
    for part, result in report["parts"].items():
        if part == "matrix":
            for name, cell in result.items():
                if isinstance(cell, dict):
                    lines.append(f"  {name:<12} " + _cell(cell))
        elif part == "lora7b" and "distft_vs_hf" in result:
            lines.append(f"  lora7b       distft {result['distft']['steady_tokens_per_second']:.0f} tok/s, HF Trainer "
                         f"{result['hf_trainer_peft']['steady_tokens_per_second']:.0f} tok/s: "
                         f"{result['distft_vs_hf']:.2f}x")
        else:
            lines.append(f"  {part:<12} " + _cell(result) + (f", MFU {result['mfu']:.1%}" if result.get("mfu") else ""))
    bad = failures(report)
    lines.append("all ran" if not bad else f"FAILED: {', '.join(bad)}")
    return "\n".join(lines)


def _cell(cell: dict) -> str:
    if "error" in cell:
        return f"error: {cell['error'][:160]}"
    if "skipped" in cell and "steps" not in cell:
        return f"skipped: {cell['skipped']}"
    check = (cell.get("export_check") or {}).get("ok")
    return (f"{cell['steps']} steps, loss {cell['losses'][0]:.3f} -> {cell['losses'][-1]:.3f}, "
            f"{cell['steady_tokens_per_second']:.0f} tok/s, peak {cell['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"(plan {cell['planned_peak_bytes'] / 2**30:.2f}), export {'ok' if check else check}")


if __name__ == "__main__":
    raise SystemExit(main())
