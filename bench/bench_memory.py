"""Per-worker memory of model + gradients + optimizer state under each strategy, 2 workers, measured two ways.

Each strategy runs in a fresh pair of processes (torch.distributed over gloo, as Ray Train sets it up on CPU workers)
that go through the real distft code: the config composed from `conf/` (`+experiment=gsm8k_full
model=smollm2_135m hardware=cpu strategy=<name>`), `Strategy.load_model` with `distft.model.load_model`,
`distft.methods.apply_method`, `Strategy.prepare` with AdamW, and two real training steps (forward, `backward`,
`step`). During the second step, after `backward` and before `step`, when parameters, gradients and Adam states are
all alive, each rank records:

(a) exact bytes of the tensors it holds, each storage counted once: its parameters (FSDP: the local DTensor shard;
    ZeRO-3: `ds_tensor`, the partition, plus any whole parameter kept by the persistence threshold), gradients
    (`.grad`, and DeepSpeed's gradient partitions/buckets found on the ZeRO optimizer by attribute name), optimizer
    state (the torch optimizer's `state` tensors, local shards), other ZeRO buffers (e.g. fp32 master partitions when
    they are not the parameters themselves), and, as a cross-check, every tensor the Python garbage collector can
    see in the process;
(b) process memory from /proc/self/status: VmRSS (and its anonymous / file-backed parts), VmHWM (peak), all as
    deltas over a baseline taken after the imports and the process group, before loading the model; also RSS after
    `malloc_trim(0)` (glibc gives cached free memory back), to show how much of RSS is allocator cache.

`--load` instead measures host memory right after loading (and after `prepare`, which completes the materialisation
for rank-0 loading) with `strategy.rank0_load` off and on.

    python bench/bench_memory.py --out docs/results/memory_cpu.json                 # or: make bench-memory
    python bench/bench_memory.py --load --out docs/results/memory_load_cpu.json
    python bench/bench_memory.py --report docs/results/memory_cpu.json               # Markdown tables
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_STRATEGIES = ["ddp", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload"]
LOAD_CASES = [("ddp", None), ("fsdp", False), ("fsdp", True), ("zero3", False), ("zero3", True)]
MiB = 2**20


# --- measurement helpers (run inside the workers) --------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class HostSampler:
    """Peaks of this process's anonymous and file-backed resident memory (RssAnon, RssFile), sampled by a thread
    every `interval` seconds, and both as they were when sampling began (`before`)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    def __enter__(self) -> "HostSampler":
        import threading

        self.before = self.read()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            if self._stop.wait(self.interval):
                return

    @staticmethod
    def read() -> dict[str, int]:
        status = proc_status()
        return {"RssAnon": status["RssAnon"], "RssFile": status["RssFile"]}

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _storage(t) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage, None for meta tensors and wrappers without one."""
    t = _local(t)
    if t is None or t.is_meta:
        return None
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _tensors_in(value, depth: int = 0):
    """Tensors inside an attribute value: tensors, and lists/tuples/dicts of them (a few levels deep)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(getattr(value, "buffer", None), torch.Tensor):  # ZeRO-3's reduce buckets
        yield value.buffer


def held_bytes(strategy) -> dict[str, int]:
    """Bytes of the storages this rank holds, by what they are; each storage is counted once (first category wins)."""
    import torch

    module = strategy.unwrap()
    seen: set[tuple[int, int]] = set()
    out = {"params": 0, "grads": 0, "optimizer_state": 0, "other_zero_buffers": 0, "comm_buckets": 0}

    def add(category: str, tensors) -> None:
        for t in tensors:
            key = _storage(t)
            if key and key not in seen:
                seen.add(key)
                out[category] += key[1]

    params = list(module.parameters())
    add("params", [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in params])
    add("params", [p for p in params if hasattr(p, "ds_tensor")])  # ZeRO-3 persistent (whole) parameters
    add("params", list(module.buffers()))
    add("grads", [p.grad for p in params if p.grad is not None])
    engine = getattr(strategy, "_engine", None)
    zero_opt = engine.optimizer if engine is not None else None
    torch_opt = getattr(zero_opt, "optimizer", None) if zero_opt is not None else strategy.optimizer
    if zero_opt is not None:
        # DeepSpeed's gradient-reduction buckets (ZeRO-2 `ipg_buffer`, ZeRO-3 `ipg_buckets`): sized by the config's
        # reduce_bucket_size (5e8 elements by default), not by the model, so they get their own column.
        for name, value in vars(zero_opt).items():
            if "ipg" in name.lower() or "bucket" in name.lower():
                add("comm_buckets", _tensors_in(value))
        for name, value in vars(zero_opt).items():
            if "grad" in name.lower():
                add("grads", _tensors_in(value))
    if isinstance(torch_opt, torch.optim.Optimizer):
        add("optimizer_state", [t for state in torch_opt.state.values() for t in _tensors_in(state)])
    detail = {}
    if zero_opt is not None:
        for name, value in vars(zero_opt).items():
            if name not in ("module", "optimizer") and "grad" not in name.lower():
                before = out["other_zero_buffers"]
                add("other_zero_buffers", _tensors_in(value))
                if out["other_zero_buffers"] > before:
                    detail[name] = out["other_zero_buffers"] - before
    out["model_grads_optimizer"] = sum(v for k, v in out.items() if k != "comm_buckets")
    # Cross-check: every tensor storage the garbage collector can reach in this process.
    all_seen: set[tuple[int, int]] = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            key = _storage(obj)
            if key:
                all_seen.add(key)
    out["all_live_tensors"] = sum(n for _, n in all_seen)
    out["other_zero_buffers_by_attribute"] = detail
    return out


def compose(strategy: str, rank0_load: bool | None, model: str):
    from distft.config import compose as compose_config

    overrides = ["+experiment=gsm8k_full", f"model={model}", "hardware=cpu", f"strategy={strategy}",
                 "scaling.num_workers=2", "trainer.micro_batch_size=1", "trainer.global_batch_size=2"]
    if rank0_load is not None:
        overrides.append(f"strategy.rank0_load={str(rank0_load).lower()}")
    return compose_config(overrides)


def worker(rank: int, port: int, case: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from distft.loss import causal_lm_loss_sum
    from distft.methods import apply_method
    from distft.model import count_params, load_model, resolve_model_dir
    from distft.strategy import build_strategy, strategy_class

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose(case["strategy"], case["rank0_load"], case["model"])
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    strategy_module = sys.modules[strategy_class(cfg.strategy.name).__module__]
    if "deepspeed" in strategy_module.__name__:
        import deepspeed  # noqa: F401  (imported before the baseline, like every other library)
    precision = case.get("precision", "fp32")  # bf16: mixed precision as on GPUs (fp32 master weights kept)
    strategy = build_strategy(cfg.strategy.name, device=torch.device("cpu"), precision=precision, micro_batch_size=1,
                              grad_accum=1, options=OmegaConf.to_container(cfg.strategy, resolve=True))
    dist.barrier()
    gc.collect()
    malloc_trim()
    base = proc_status()
    marks: dict[str, dict] = {}

    def mark(name: str) -> None:
        marks[name] = {k: v - base.get(k, 0) if k != "VmHWM" else v - base["VmRSS"] for k, v in proc_status().items()}

    t0 = time.perf_counter()
    model = strategy.load_model(partial(load_model, model_dir, dtype="fp32", attn_implementation="sdpa"),
                                rank=rank, quantized=False)
    mark("after_load")
    model = apply_method(model, name="full")
    _, total_params = count_params(model)
    strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-5),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    dist.barrier()
    mark("after_prepare")
    load_seconds = time.perf_counter() - t0
    result = {"rank": rank, "case": case, "total_params": total_params, "load_seconds": load_seconds,
              "baseline": base}
    if not case["load_only"]:
        ids = torch.randint(0, model.config.vocab_size, (1, case["seq_len"]), generator=torch.Generator().manual_seed(rank))

        def forward_backward():
            with strategy.sync_context(sync=True):
                with strategy.forward_context():
                    logits = strategy.model(input_ids=ids, use_cache=False).logits
                loss = causal_lm_loss_sum(logits, ids) / ids.numel()
                strategy.backward(loss)
            return float(loss.detach())

        losses = [forward_backward()]
        strategy.step(1.0)
        losses.append(forward_backward())
        gc.collect()
        result["held_bytes"] = held_bytes(strategy)  # parameters, gradients and Adam states all alive
        mark("after_backward_step2")
        malloc_trim()
        mark("after_backward_step2_trimmed")
        strategy.step(1.0)
        mark("after_step2")
        result["losses"] = losses
    result["rss"] = marks
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# --- driver ------------------------------------------------------------------------------------------------------

def spawn_ranks(target, case: dict, out_dir: str, timeout: int) -> list[int]:
    """Run `target(rank, port, case, out_dir)` as two spawned processes (ranks 0 and 1); kill what is still alive
    after `timeout` seconds. Their exit codes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port = random.randint(20000, 60000)
    procs = [ctx.Process(target=target, args=(r, port, case, out_dir)) for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(timeout=max(1, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def run_case(case: dict, timeout: int = 1200) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="distft-bench-mem-") as tmp:
        codes = spawn_ranks(worker, case, tmp, timeout)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"{case}: workers exited with {codes}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(TRAIN_STRATEGIES))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: mixed precision as on GPUs (the weights stay fp32 masters)")
    parser.add_argument("--model", default="smollm2_135m", help="conf/model preset (tiny_llama for a smoke test)")
    parser.add_argument("--load", action="store_true", help="host memory at load, rank0_load off vs on")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="print the tables of a recorded run and exit")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return
    command = "python bench/bench_memory.py " + " ".join(sys.argv[1:])
    res = {"command": command, "machine": machine(), "mode": "load" if args.load else "train", "runs": []}
    cases = ([{"strategy": s, "rank0_load": r, "load_only": True, "seq_len": 0, "model": args.model}
              for s, r in LOAD_CASES] if args.load
             else [{"strategy": s, "rank0_load": None, "load_only": False, "seq_len": args.seq_len, "model": args.model,
               "precision": args.precision}
                   for s in args.strategies.split(",")])
    for case in cases:
        t0 = time.time()
        ranks = run_case(case)
        res["runs"].append({"case": case, "ranks": ranks, "wall_seconds": time.time() - t0})
        print(f"{case['strategy']} (rank0_load={case['rank0_load']}): {time.time() - t0:.0f} s", flush=True)
        if args.out:  # keep what is done if a later case fails
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def markdown(res: dict) -> str:
    lines = []
    runs = res["runs"]
    if res["mode"] == "train":
        ddp = next((r for r in runs if r["case"]["strategy"] == "ddp"), None)
        ddp_held = max(x["held_bytes"]["model_grads_optimizer"] for x in ddp["ranks"]) if ddp else None
        ddp_rss = max(x["rss"]["after_backward_step2"]["VmRSS"] for x in ddp["ranks"]) if ddp else None
        lines += ["(a) Exact bytes held per worker (MiB), after the second backward, before its optimizer step; "
                  "max over the 2 ranks (rank 0 / rank 1 in brackets for the total).", "",
                  "| strategy | params | grads | optimizer state | other ZeRO buffers | model + grads + optimizer "
                  "(rank 0 / 1) | ratio to DDP | DeepSpeed reduce buckets | all live tensors (gc) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            hb = [x["held_bytes"] for x in r["ranks"]]
            worst = max(hb, key=lambda h: h["model_grads_optimizer"])
            ratio = f"{worst['model_grads_optimizer'] / ddp_held:.3f}×" if ddp_held else "-"
            lines.append(f"| {r['case']['strategy']} | {_mib(worst['params'])} | {_mib(worst['grads'])} | "
                         f"{_mib(worst['optimizer_state'])} | {_mib(worst['other_zero_buffers'])} | "
                         f"**{_mib(worst['model_grads_optimizer'])}** ({' / '.join(_mib(h['model_grads_optimizer']) for h in hb)}) | "
                         f"**{ratio}** | {_mib(worst['comm_buckets'])} | {_mib(max(h['all_live_tensors'] for h in hb))} |")
        lines += ["", "(b) Process memory per worker (MiB above the pre-load baseline), max over the 2 ranks.", "",
                  "| strategy | RSS after load | RSS after prepare | RSS after 2nd backward | ratio to DDP | "
                  "same, after malloc_trim | anonymous / file-backed | peak RSS (VmHWM) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            rs = [x["rss"] for x in r["ranks"]]
            snap = max(rs, key=lambda m: m["after_backward_step2"]["VmRSS"])["after_backward_step2"]
            trimmed = max(m["after_backward_step2_trimmed"]["VmRSS"] for m in rs)
            ratio = f"{snap['VmRSS'] / ddp_rss:.3f}×" if ddp_rss else "-"
            lines.append(f"| {r['case']['strategy']} | {_mib(max(m['after_load']['VmRSS'] for m in rs))} | "
                         f"{_mib(max(m['after_prepare']['VmRSS'] for m in rs))} | {_mib(snap['VmRSS'])} | {ratio} | "
                         f"{_mib(trimmed)} | {_mib(snap['RssAnon'])} / {_mib(snap['RssFile'])} | "
                         f"{_mib(max(m['after_step2']['VmHWM'] for m in rs))} |")
    else:
        lines += ["Host memory per worker right after loading SmolLM2-135M (fp32, 517 MiB of weights), MiB above "
                  "the pre-load baseline.", "",
                  "| strategy | rank0_load | RSS after load, rank 0 / rank 1 | RSS after prepare, rank 0 / rank 1 | "
                  "peak RSS through prepare, rank 0 / rank 1 | load + prepare seconds |", "|---|---|---|---|---|---|"]
        for r in runs:
            rs = [x["rss"] for x in r["ranks"]]
            rl = r["case"]["rank0_load"]
            lines.append(f"| {r['case']['strategy']} | {'-' if rl is None else str(rl).lower()} | "
                         f"{' / '.join(_mib(m['after_load']['VmRSS']) for m in rs)} | "
                         f"{' / '.join(_mib(m['after_prepare']['VmRSS']) for m in rs)} | "
                         f"{' / '.join(_mib(m['after_prepare']['VmHWM']) for m in rs)} | "
                         f"{max(x['load_seconds'] for x in r['ranks']):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
