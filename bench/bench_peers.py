"""distft against the tools a user would pick instead, on the same work, in one run (CPU).

Systems (each a separate command, timed as a whole process, one after another on an otherwise idle machine):

  distft     `python -m distft.train` — 2 Ray CPU workers (1 thread each), the framework's normal launch
  distft_1w  the same command with 1 Ray worker of 2 threads (tells Ray + DDP cost apart from the loop's)
  trl        TRL `SFTTrainer` + a peft `LoraConfig`: packing on (best-fit decreasing, padding-free rows), loss on the
             completion only — the recipe of most Llama-2 tutorials; 1 process, 2 threads
  hf         HF `Trainer` + peft with padding collation (`DataCollatorForSeq2Seq`), one example per row; 1 process,
             2 threads
  plain      a hand-written PyTorch loop over distft's packed rows: the floor; 1 process, 2 threads

The work is the same for all: SmolLM2-135M (embedded), the first `--train-examples` GSM8K train examples tokenised
once with distft's formatter (SmolLM2's chat template; handed to the peers pre-tokenised, so every system trains on
the same tokens and the comparison is of training, not of templates), seq_len 512, LoRA r=16 alpha 32 dropout 0.05
on all linear layers, fp32, AdamW (lr 2e-4, no weight decay), 2 warm-up steps then cosine to 0, gradient clipping
at 1.0, `--steps` optimizer steps of `--global-rows` rows of 512 token slots (the padded peer: as many examples per
step as distft's packed rows hold on average), micro-batches of `--micro` rows, loss on answer tokens only.

Per system: non-padding tokens/s in steady state (steps after `--warmup`, step end to step end), end-to-end wall
time of the command, peak RSS per process, the held-out answer-token loss of the exported adapter on the first
`--eval-examples` GSM8K test examples (one evaluator for all, run after the timed command), and the share of token
slots the forwards spent on padding. For distft, the CPU share of every Ray process that is not a training worker
during steady state (driver, raylet, GCS, dashboard, distft's stop-flag actor, Train's controller, ...).

    pip install -e '.[bench]'                                            # TRL, pinned in requirements/bench.txt
    python bench/bench_peers.py --out bench/results/peers_cpu.json       # ~20 min on 2 idle cores; or make bench-peers
    python bench/bench_peers.py --report bench/results/peers_cpu.json    # Markdown tables of a recorded run
    python bench/bench_peers.py --dry-run --out /tmp/peers.json          # tiny random Llama, 3 steps: CI runs this

Internal modes: `--child SYSTEM --spec FILE --dir DIR` (one peer's training) and `--eval ADAPTER --spec FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYSTEMS = ("distft", "distft_1w", "trl", "hf", "plain")
THREADS = 2  # the machine: 2 cores, given whole to each system
MODELS = {  # model=... overrides of the real run and of --dry-run
    "smollm2": ["model=smollm2_135m"],
    "tiny": ["model=tiny_llama"],
}


# --- the shared work -------------------------------------------------------------------------------------------


def make_spec(args) -> dict:
    """Everything a system needs to run the same work; written to a file that each child reads."""
    return {
        "model": "tiny" if args.dry_run else "smollm2",
        "data": str(Path(args.data).resolve()),
        "seq_len": args.seq_len, "steps": args.steps, "warmup_steps": 2, "global_rows": args.global_rows,
        "micro": args.micro, "lr": 2e-4, "max_grad_norm": 1.0, "seed": 42,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "train_examples": args.train_examples, "eval_examples": args.eval_examples, "threads": THREADS,
    }


def distft_overrides(spec: dict, *, workers: int, storage: Path, name: str) -> list[str]:
    """The overrides of `python -m distft.train` for this work: what a user would type."""
    return ["+experiment=gsm8k_lora", *MODELS[spec["model"]], "hardware=cpu", f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={THREADS // workers}", f"data.path={spec['data']}",
            f"data.seq_len={spec['seq_len']}", f"data.max_train_examples={spec['train_examples']}",
            f"trainer.max_steps={spec['steps']}", f"trainer.micro_batch_size={spec['micro']}",
            f"trainer.global_batch_size={spec['global_rows']}", f"trainer.lr={spec['lr']}",
            "trainer.lr_schedule=cosine", f"trainer.warmup_steps={spec['warmup_steps']}",
            f"trainer.max_grad_norm={spec['max_grad_norm']}", f"trainer.seed={spec['seed']}",
            f"method.lora_r={spec['lora_r']}", f"method.lora_alpha={spec['lora_alpha']}",
            f"method.lora_dropout={spec['lora_dropout']}", "trainer.checkpoint_every=100000",
            "trainer.progress_bar=false", "eval.enabled=false", "eval.at_start=false", "logger=none",
            f"run.storage_path={storage}", f"run.name={name}"]


def work_config(spec: dict):
    from distft.config import compose

    return compose(distft_overrides(spec, workers=1, storage=Path("/tmp"), name="bench"))


def model_and_tokenizer_dir(spec: dict) -> tuple[str, object, str]:
    """(model dir, tokenizer, template) exactly as distft's workers resolve them."""
    from omegaconf import OmegaConf

    from distft.model import load_tokenizer, resolve_model_dir

    cfg = work_config(spec)
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    template = cfg.data.template if cfg.model.chat_template else "plain"
    return model_dir, load_tokenizer(model_dir), template


def encoded_examples(spec: dict, tokenizer, template: str, split: str, limit: int) -> list[tuple[list, list]]:
    """(input_ids, labels) per example, tokenised by distft's formatter (labels -100 on the prompt)."""
    from distft.data.format import encode_examples
    from distft.data.sources import load_examples

    examples = load_examples("gsm8k", spec["data"], split, limit=limit)
    encoded, _ = encode_examples(tokenizer, examples, template, spec["seq_len"])
    return encoded


def lora_model(spec: dict, model_dir: str):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, lora_config(spec))


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


# --- the peers (child processes) -------------------------------------------------------------------------------


class StepLog:
    """Counts the token slots and non-padding tokens every forward sees, and writes one row per optimizer step
    (wall-clock time of its end, its tokens) to `steps.jsonl`, which the parent watches to find steady state."""

    def __init__(self, model, path: Path, *, hook: bool = True):
        self.file = path.open("w")
        self.slots = self.real = 0
        self.rows: list[dict] = []
        if hook:  # the trainers' batches: padding is where the attention mask is 0
            model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.slots += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    def step_end(self, loss: float | None = None) -> None:
        row = {"step": len(self.rows) + 1, "time": time.time(), "slots": self.slots, "tokens": self.real}
        if loss is not None:
            row["loss"] = loss
        self.slots = self.real = 0
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def trainer_args(spec: dict, out: Path, *, micro: int, accum: int, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(output_dir=str(out / "hf_out"), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
               max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="cosine",
               warmup_steps=spec["warmup_steps"], weight_decay=0.0, max_grad_norm=spec["max_grad_norm"],
               optim="adamw_torch", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to=[],
               seed=spec["seed"], dataloader_num_workers=0, disable_tqdm=True, **extra)


def step_callback(log: StepLog):
    from transformers import TrainerCallback

    class OnStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            log.step_end()

    return OnStepEnd()


def run_trl(spec: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model_dir, tokenizer, template = model_and_tokenizer_dir(spec)
    encoded = encoded_examples(spec, tokenizer, template, "train", spec["train_examples"])
    data = Dataset.from_dict({"input_ids": [ids for ids, _ in encoded],
                              "completion_mask": [[int(x != -100) for x in labels] for _, labels in encoded]})
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    micro = spec["micro"]
    args = trainer_args(spec, out, micro=micro, accum=spec["global_rows"] // micro, cls=SFTConfig,
                        max_length=spec["seq_len"], packing=True, packing_strategy="bfd", completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora_config(spec))
    log = StepLog(trainer.model, out / "steps.jsonl")
    trainer.add_callback(step_callback(log))
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"rows": log.rows, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "examples": len(encoded), "packed_rows": len(trainer.train_dataset)}


def examples_per_packed_row(spec: dict, tokenizer) -> float:
    from distft.recipe import training_rows

    rows, stats, _ = training_rows(work_config(spec), tokenizer)
    return (stats["examples"] - stats["dropped_too_long"]) / len(rows)


def run_hf(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer

    model_dir, tokenizer, template = model_and_tokenizer_dir(spec)
    encoded = encoded_examples(spec, tokenizer, template, "train", spec["train_examples"])
    data = Dataset.from_dict({"input_ids": [ids for ids, _ in encoded], "labels": [lab for _, lab in encoded]})
    # as many examples per step as distft's packed rows hold on average: the same data per update
    per_row = examples_per_packed_row(spec, tokenizer)
    accum = spec["global_rows"] // spec["micro"]
    micro = max(1, round(spec["global_rows"] * per_row / accum))
    model = lora_model(spec, model_dir)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(model=model, args=trainer_args(spec, out, micro=micro, accum=accum), train_dataset=data,
                      data_collator=collator)
    log = StepLog(trainer.model, out / "steps.jsonl")
    trainer.add_callback(step_callback(log))
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"rows": log.rows, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "examples": len(encoded), "examples_per_step": micro * accum, "micro_examples": micro}


def run_plain(spec: dict, out: Path) -> dict:
    """Forward → summed CE on shifted labels / the step's answer tokens → backward → clip → AdamW → cosine."""
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    from distft.data.loader import collate
    from distft.data.packing import padding_stats
    from distft.recipe import training_rows

    model_dir, tokenizer, _ = model_and_tokenizer_dir(spec)
    rows, _, _ = training_rows(work_config(spec), tokenizer)
    model = lora_model(spec, model_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, spec["warmup_steps"], spec["steps"])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    micro, accum = spec["micro"], spec["global_rows"] // spec["micro"]
    log = StepLog(model, out / "steps.jsonl", hook=False)  # packed rows have no mask: count from the rows
    pos = 0
    for _ in range(spec["steps"]):
        batches = []
        for _ in range(accum):
            idx = [order[(pos + i) % len(order)] for i in range(micro)]
            pos += micro
            stats = padding_stats([rows[i] for i in idx], spec["seq_len"])
            log.slots += stats["tokens"]
            log.real += stats["non_padding_tokens"]
            batches.append(collate([rows[i] for i in idx], tokenizer.pad_token_id))
        answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            # no cache: with one, transformers ignores the packing in position_ids and attends across examples
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100,
                                   reduction="sum") / answer_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.step_end(total)
    model.save_pretrained(str(out / "adapter"))
    return {"rows": log.rows, "losses": [r["loss"] for r in log.rows], "packed_rows": len(rows)}


PEERS = {"trl": run_trl, "hf": run_hf, "plain": run_plain}


def child(system: str, spec: dict, out: Path) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = PEERS[system](spec, out)
    (out / "child.json").write_text(json.dumps(result))


# --- the held-out loss (one evaluator for every system) --------------------------------------------------------


def heldout_loss(spec: dict, adapter: str | None) -> dict:
    """Mean loss per answer token on the first eval examples, unpacked, batches of 8 padded rows."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distft.data.loader import collate
    from distft.data.packing import unpacked_rows

    torch.set_num_threads(spec["threads"])
    model_dir, tokenizer, template = model_and_tokenizer_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    rows = unpacked_rows(encoded_examples(spec, tokenizer, template, "test", spec["eval_examples"]))
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            b = collate(rows[i : i + 8], tokenizer.pad_token_id)
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=b.get("attention_mask"), use_cache=False).logits
            loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum"))
            count += int((b["labels"][:, 1:] != -100).sum())
    return {"heldout_loss": loss_sum / count, "heldout_answer_tokens": count, "heldout_examples": len(rows)}


# --- the parent: run, watch, collect ---------------------------------------------------------------------------


def role(proc, root_pid: int) -> str | None:
    """What a process of the command's tree is; None while a Ray worker has not yet taken its title."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or unreadable
        return None
    if proc.pid == root_pid:
        return "main"
    title = cmd[0] if cmd else ""
    if title.startswith("ray::"):  # Ray workers retitle themselves after their actor or task
        name = title[5:].split(".")[0].split()[0]
        return "train_worker" if name == "RayTrainWorker" else f"ray::{name}"
    if os.path.basename(title) in ("raylet", "gcs_server"):
        return "ray:" + os.path.basename(title)
    for arg in cmd[1:3]:
        if arg.endswith(".py"):
            return None if arg.endswith("default_worker.py") else "ray:" + os.path.basename(arg)[:-3]
    return "other"


class Watcher:
    """Samples the command's whole process tree every `every` s: RSS and CPU time per process, and the number of
    steps written so far (the progress file), to find the steady-state window afterwards."""

    def __init__(self, pid: int, progress: Path, every: float = 0.5, role=None):
        import psutil

        self.root = psutil.Process(pid)
        self.progress, self.every = progress, every
        self.role = role or globals()["role"]
        self.procs: dict[int, dict] = {}
        self.steps: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            now = time.time()
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except Exception:  # noqa: BLE001 - the root exited
                tree = []
            for p in tree:
                try:
                    with p.oneshot():
                        rss, cpu = p.memory_info().rss, sum(p.cpu_times()[:2])
                        entry = self.procs.setdefault(p.pid, {"role": None, "rss_max": 0, "samples": []})
                        entry["role"] = self.role(p, self.root.pid) or entry["role"]
                        entry["rss_max"] = max(entry["rss_max"], rss)
                        entry["samples"].append((now, cpu))
                except Exception:  # noqa: BLE001 - exited between listing and reading
                    continue
            try:
                n = sum(1 for line in self.progress.open() if line.strip())
            except OSError:
                n = 0
            self.steps.append((now, n))
            self.done.wait(self.every)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def window(self, warmup: int) -> tuple[float, float] | None:
        """From the first sample with more than `warmup` steps written to the first with all of them."""
        last = self.steps[-1][1] if self.steps else 0
        start = next((t for t, n in self.steps if n > warmup), None)
        end = next((t for t, n in self.steps if n == last), None)
        return (start, end) if start and end and end > start else None

    def cpu_share(self, t0: float, t1: float) -> dict:
        """CPU seconds per second of wall time in [t0, t1], summed per role (1.0 = one core busy)."""
        out: dict[str, float] = {}
        for entry in self.procs.values():
            inside = [(t, c) for t, c in entry["samples"] if t0 <= t <= t1]
            before = [(t, c) for t, c in entry["samples"] if t < t0]
            if not inside:
                continue
            first = before[-1] if before else inside[0]
            if inside[-1][0] <= first[0]:
                continue
            # over the span between the two samples used: with sparse samples t1 - t0 would overstate the share
            name = entry["role"] or "ray:worker_starting"
            out[name] = out.get(name, 0.0) + (inside[-1][1] - first[1]) / (inside[-1][0] - first[0])
        return {k: round(v, 4) for k, v in sorted(out.items())}

    def rss(self) -> dict:
        """Peak RSS per role: the largest single process, and how many processes had the role."""
        out: dict[str, dict] = {}
        for entry in self.procs.values():
            r = out.setdefault(entry["role"] or "ray:worker_starting", {"max_bytes": 0, "processes": 0})
            r["max_bytes"] = max(r["max_bytes"], entry["rss_max"])
            r["processes"] += 1
        return out


def run_system(system: str, spec: dict, spec_file: Path, work: Path, *, warmup: int, extra: list[str]) -> dict:
    out = work / system
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if system.startswith("distft"):
        workers = 2 if system == "distft" else 1
        cmd = [sys.executable, "-m", "distft.train",
               *distft_overrides(spec, workers=workers, storage=out, name="run"), *extra]
        progress = out / "run" / "metrics.jsonl"
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--spec", str(spec_file),
               "--dir", str(out)]
        progress = out / "steps.jsonl"
        env["OMP_NUM_THREADS"] = str(THREADS)
    print(f"[bench_peers] {system}: {' '.join(cmd)}", flush=True)
    started = time.time()
    with (out / "log.txt").open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        watch = Watcher(proc.pid, progress)
        code = proc.wait()
    wall = time.time() - started
    watch.stop()
    if code != 0:
        raise RuntimeError(f"{system} exited with {code}; see {out / 'log.txt'}")
    result = {"system": system, "command": cmd, "wall_seconds": round(wall, 2), "rss": watch.rss()}
    window = watch.window(warmup)
    if window:
        result["cpu_share_steady"] = watch.cpu_share(*window)
    if system.startswith("distft"):
        result.update(distft_steps(spec, out / "run", workers=workers))
        adapter = out / "run" / "export"
    else:
        child_result = json.loads((out / "child.json").read_text())
        result.update(child_result)
        adapter = out / "adapter"
    rows = result["rows"]
    steady = rows[warmup:]
    seconds = steady[-1]["time"] - rows[warmup - 1]["time"] if warmup else None
    result["steady_tokens_per_second"] = sum(r["tokens"] for r in steady) / seconds
    result["steady_step_seconds"] = seconds / len(steady)
    result["padding_share"] = 1 - sum(r["tokens"] for r in rows) / sum(r["slots"] for r in rows)
    result["tokens_trained"] = sum(r["tokens"] for r in rows)
    result.update(evaluate(spec_file, adapter))
    return result


def distft_steps(spec: dict, run_dir: Path, *, workers: int) -> dict:
    """distft's metrics rows with the non-padding tokens of each step, rebuilt from the same rows and sharding as the
    workers used (metrics.jsonl counts every token slot), and checked against the slots it recorded."""
    from distft.data import ShardedBatches
    from distft.data.packing import padding_stats
    from distft.recipe import training_rows
    from distft.tracking import read_metrics

    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    _, tokenizer, _ = model_and_tokenizer_dir(spec)
    rows, _, _ = training_rows(work_config(spec), tokenizer)
    accum = spec["global_rows"] // (spec["micro"] * workers)
    streams = [ShardedBatches(rows, micro_batch_size=spec["micro"], rank=r, world_size=workers, seed=spec["seed"],
                              shuffle=True, pad_id=tokenizer.pad_token_id) for r in range(workers)]
    shards = [s.shard(0) for s in streams]  # the bench's steps stay within the first epoch
    out_rows, end = [], None
    for k, m in enumerate(metrics):
        slots = real = 0
        for r in range(workers):
            shard = shards[r]
            for i in range(k * accum, (k + 1) * accum):
                picked = [rows[j] for j in shard[i * spec["micro"] : (i + 1) * spec["micro"]] if j is not None]
                stats = padding_stats(picked, spec["seq_len"])
                slots, real = slots + stats["tokens"], real + stats["non_padding_tokens"]
        recorded = round(m["tokens_per_second"] * m["step_seconds"])
        if abs(recorded - slots) > 1:
            raise AssertionError(f"step {m['step']}: rebuilt {slots} token slots, distft recorded {recorded}")
        end = (end or 0.0) + m["step_seconds"]
        out_rows.append({"step": m["step"], "time": end, "slots": slots, "tokens": real, "loss": m["loss"]})
    return {"rows": out_rows, "losses": [m["loss"] for m in metrics], "packed_rows": len(rows),
            "distft_summary": {k: summary.get(k) for k in ("status", "tokens_per_second", "peak_memory_bytes",
                                                            "wall_seconds", "export_check")}}


def evaluate(spec_file: Path, adapter: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--eval", str(adapter or ""), "--spec", str(spec_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise RuntimeError(f"held-out evaluation of {adapter} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state figures")
    p.add_argument("--global-rows", type=int, default=4, help="rows of seq_len token slots per optimizer step")
    p.add_argument("--micro", type=int, default=2, help="rows per forward")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--data", default=os.environ.get("GSM8K_DIR", str(REPO.parent / "shared/data/gsm8k")))
    p.add_argument("--distft-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for the distft systems (ablations), repeatable")
    p.add_argument("--work", default=None, help="directory for the runs (default: a fresh temporary one)")
    p.add_argument("--out", default=None)
    p.add_argument("--report", metavar="JSON")
    p.add_argument("--dry-run", action="store_true", help="tiny random Llama, 3 steps, 64 examples: CI")
    p.add_argument("--child")
    p.add_argument("--eval")
    p.add_argument("--spec")
    p.add_argument("--dir")
    args = p.parse_args(argv)

    if args.child:
        child(args.child, json.loads(Path(args.spec).read_text()), Path(args.dir))
        return 0
    if args.eval is not None:
        print(json.dumps(heldout_loss(json.loads(Path(args.spec).read_text()), args.eval or None)))
        return 0
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return 0
    if args.dry_run:
        args.steps, args.train_examples, args.eval_examples, args.seq_len = 4, 64, 8, 256
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_peers-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = make_spec(args)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    report = {"spec": spec, "warmup": args.warmup, "distft_overrides": args.distft_override, "machine": machine(), "started": time.strftime("%F %T"),
              "base_model": evaluate(spec_file, None), "systems": {}}
    for system in systems:
        load = os.getloadavg()[0]
        res = run_system(system, spec, spec_file, work, warmup=args.warmup, extra=args.distft_override)
        res["load_before"] = load
        report["systems"][system] = res
        print(f"[bench_peers] {system}: {res['steady_tokens_per_second']:.0f} tokens/s, "
              f"wall {res['wall_seconds']:.0f} s, held-out loss {res['heldout_loss']:.4f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "versions": {m: _version(m) for m in ("transformers", "peft", "trl", "ray", "accelerate")}}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def markdown(report: dict) -> str:
    systems = report["systems"]
    base = report["base_model"]["heldout_loss"]
    ref = systems.get("distft", {}).get("steady_tokens_per_second")
    lines = [f"Held-out answer-token loss of the base model: {base:.4f}", "",
             "| system | non-padding tokens/s | vs distft | wall s | padding share | held-out loss | "
             "peak RSS (largest process) | processes |", "|---|---|---|---|---|---|---|---|"]
    for name, r in systems.items():
        peak = max(v["max_bytes"] for v in r["rss"].values())
        procs = sum(v["processes"] for v in r["rss"].values())
        ratio = f"{r['steady_tokens_per_second'] / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {name} | {r['steady_tokens_per_second']:.0f} | {ratio} | {r['wall_seconds']:.0f} | "
                     f"{r['padding_share']:.1%} | {r['heldout_loss']:.4f} | {peak / 2**30:.2f} GiB | {procs} |")
    for name, r in systems.items():
        if not name.startswith("distft"):
            continue
        lines += ["", f"{name}: peak RSS and steady-state CPU share (cores) per process role", "",
                  "| role | processes | peak RSS of one | CPU share (cores) |", "|---|---|---|---|"]
        share = r.get("cpu_share_steady", {})
        for role_name, v in sorted(r["rss"].items()):
            lines.append(f"| {role_name} | {v['processes']} | {v['max_bytes'] / 2**20:.0f} MiB | "
                         f"{share.get(role_name, 0.0):.3f} |")
        others = sum(v for k, v in share.items() if k not in ("train_worker", "main"))
        lines.append(f"| non-worker Ray processes, together | | | {others:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
