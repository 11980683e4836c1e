"""Loading, checkpointing and export at the largest Llama shapes this machine holds, 2 CPU workers, distft today
against distft before issue 13 (an older checkout), with the planner's prediction beside each figure.

Two parts, each on a random-initialised Llama written once as a bf16 checkpoint in 2 GB safetensors shards:

- `3b` (OpenLLaMA-3B's shape: 26 layers x 3200 hidden, 3.4B parameters, 6.9 GB in bf16), LoRA with the base in bf16:
  loading (through `Strategy.prepare`) under ddp / fsdp / zero3 — the largest model whose bf16 weights two workers
  can hold on 24 GiB. Load only: a bf16 backward of this model takes over 5 minutes on this CPU (no bf16 units).
- `0.35b` (24 layers x 1024 hidden), full fine-tuning in fp32 (weights, gradients and Adam states: 16 bytes per
  parameter, as bf16 mixed precision keeps them): one training step, checkpoint save / restore and the export of a
  full model under fsdp and zero3. At 0.7B (24 x 1536) FSDP ran, but ZeRO-3's first step was killed for memory
  (its step holds about 4.6 fp32 partitions of temporaries, which the planner then missed), so both run here.

Each case runs in a fresh pair of processes (torch.distributed over gloo, as Ray Train sets it up on CPU workers)
through the real distft code: `Strategy.load_model` with `distft.model.load_model`, `apply_method`,
`Strategy.prepare` with AdamW, one training step, `distft.checkpoint.save_checkpoint` and `load_checkpoint`, and
`distft.export.export_and_verify` (today's code with `run.export_check=tensors`; the old code reloads the export on
rank 0, its only check). Every phase starts with a barrier and a reset of each rank's peak RSS
(/proc/self/clear_refs), so a phase's peak is its own; "node" is the sum of the two ranks' peaks (an upper bound: the
two peaks need not coincide, and file pages both ranks map are counted twice).

    git worktree add /tmp/distft-before b3a27a7      # distft before issue 13 (streaming load, sharded export)
    python bench/bench_scale.py --before /tmp/distft-before --out docs/results/scale_cpu.json     # ~10 min
    python bench/bench_scale.py --report docs/results/scale_cpu.json                              # the tables
    python bench/bench_scale.py --shape tiny --out /tmp/scale.json                                # smoke test
"""

import argparse
import gc
import inspect
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_memory import machine, malloc_trim, proc_status, spawn_ranks  # noqa: E402  (no distft import at module level)

GiB = 2**30
SHAPES = {  # LlamaConfig keys; vocabulary as Llama-2's
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "0.35b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# (part, shape, method, strategy, strategy.rank0_load or None for the default, code: "today" | "before")
# load: bf16, load only; state: fp32, every phase
PARTS = {
    "load": [("3b", "lora", "ddp", None, "today"), ("3b", "lora", "fsdp", None, "before"),
             ("3b", "lora", "fsdp", False, "today"), ("3b", "lora", "fsdp", None, "today"),
             ("3b", "lora", "zero3", None, "before"), ("3b", "lora", "zero3", None, "today")],
    "state": [("0.35b", "full", "fsdp", None, "before"), ("0.35b", "full", "fsdp", None, "today"),
              ("0.35b", "full", "zero3", None, "before"), ("0.35b", "full", "zero3", None, "today")],
}
PRECISION = {"load": "bf16", "state": "fp32"}
PHASES = ("load", "prepare", "step", "save", "restore", "export")
# ZeRO-3's default buckets (5e8 elements each, 2 GB in fp32 per rank) are sized for GPUs; smaller ones, as a user of a
# small machine sets them (the planner reads them too)
SMALL_ZERO_BUCKETS = ("+strategy.deepspeed={zero_optimization:{reduce_bucket_size:50000000,"
                      "allgather_bucket_size:50000000,stage3_prefetch_bucket_size:50000000,"
                      "stage3_max_live_parameters:50000000,stage3_max_reuse_distance:50000000}}")


# --- the checkpoint --------------------------------------------------------------------------------------------

def build_checkpoint(shape: str, root: Path) -> Path:
    """A random-initialised Llama of `shape` saved in bf16 (2 GB shards) with the embedded tokenizer, once."""
    out = root / f"random-llama-{shape}-bf16"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from distft.model import ensure_embedded_model, load_tokenizer

    tok = load_tokenizer(str(ensure_embedded_model()))
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- one case, in two ranks ------------------------------------------------------------------------------------

def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(rank: int, port: int, case: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, case["code_dir"])  # which distft this case measures
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import distft
    from distft import settings
    from distft.checkpoint import load_checkpoint, save_checkpoint
    from distft.config import compose
    from distft.export import export_and_verify
    from distft.loss import causal_lm_loss_sum
    from distft.methods import apply_method
    from distft.model import load_model, load_tokenizer
    from distft.strategy import build_strategy, strategy_class

    assert Path(distft.__file__).resolve().is_relative_to(Path(case["code_dir"]).resolve()), distft.__file__
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose(overrides(case))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if "deepspeed" in sys.modules[strategy_class(cfg.strategy.name).__module__].__name__:
        import deepspeed  # noqa: F401  (imported before the baseline, like every other library)
    method, precision, model_dir = case["method"], case["precision"], case["model_dir"]
    load_dtype = settings.load_dtype(method, precision=precision)
    tokenizer = load_tokenizer(model_dir)
    strategy = build_strategy(cfg.strategy.name, device=torch.device("cpu"), precision=precision, micro_batch_size=1,
                              grad_accum=1, options=OmegaConf.to_container(cfg.strategy, resolve=True))
    work = Path(out_dir) / "work"
    dist.barrier()
    gc.collect()
    malloc_trim()
    base = proc_status()
    result = {"rank": rank, "case": case, "baseline": base, "phases": {}}

    def save() -> None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))

    def phase(name: str):
        class Phase:
            def __enter__(self):
                dist.barrier()
                gc.collect()
                malloc_trim()
                reset_peak()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if exc[0] is not None:
                    return False
                seconds = time.perf_counter() - self.t0
                dist.barrier()
                now = proc_status()
                gc.collect()
                malloc_trim()
                result["phases"][name] = {"seconds": seconds, "peak_rss": now["VmHWM"] - base["VmRSS"],
                                          "rss_after": proc_status()["VmRSS"] - base["VmRSS"],
                                          "anon_after": proc_status()["RssAnon"] - base["RssAnon"]}
                save()  # what is done survives a later phase killed for memory
                return False
        return Phase()

    with phase("load"):  # FSDP streams the weights in during prepare, ZeRO-3 here
        model = strategy.load_model(partial(load_model, model_dir, dtype=load_dtype, attn_implementation="sdpa"),
                                    rank=rank, quantized=False)
        model = apply_method(model, name=method, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                             target_modules=["all-linear"])
    with phase("prepare"):
        strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-5),
                         lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    if case["part"] == "load":
        dist.barrier()
        dist.destroy_process_group()
        return
    ids = torch.randint(0, model.config.vocab_size, (1, case["seq_len"]), generator=torch.Generator().manual_seed(rank))
    with phase("step"):
        with strategy.sync_context(sync=True):
            with strategy.forward_context():
                logits = strategy.model(input_ids=ids, use_cache=False).logits
            loss = causal_lm_loss_sum(logits, ids) / ids.numel()
            strategy.backward(loss)
        del logits
        strategy.step(1.0)
        result["loss"] = float(loss.detach())
    ckpt = work / "checkpoint"
    with phase("save"):  # each rank into a directory of its own, as on Ray Train workers
        save_checkpoint(work / f"save{rank}", strategy=strategy, rank=rank, world_size=2, step=1, loader_state={},
                        info={})
    dist.barrier()
    for path in sorted(p for p in (work / f"save{rank}").rglob("*") if p.is_file()):  # what Ray's report merges
        target = ckpt / path.relative_to(work / f"save{rank}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    dist.barrier()
    with phase("restore"):
        load_checkpoint(ckpt, strategy=strategy, rank=rank, world_size=2)
    export_dir = work / "export"
    check = {"check": "tensors"} if "check" in inspect.signature(export_and_verify).parameters else {}
    with phase("export"):
        info = export_and_verify(strategy, tokenizer, export_dir=export_dir, probe=ids[:, :16], rank=rank,
                                 device=torch.device("cpu"), method=method, dtype=load_dtype, quant_config=None,
                                 precision=precision, run_dir=work, **check)
    if rank == 0:
        result["checkpoint_bytes"] = dir_bytes(ckpt)
        result["export_bytes"] = dir_bytes(export_dir)
        result["export_check"] = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str, bool))}
        result["export_check_mode"] = check.get("check", "logits")
    save()
    dist.barrier()
    dist.destroy_process_group()


def overrides(case: dict) -> list[str]:
    out = [f"+experiment=gsm8k_{case['method']}", "hardware=cpu", f"strategy={case['strategy']}",
           "scaling.num_workers=2", "trainer.micro_batch_size=1", "trainer.global_batch_size=2",
           f"trainer.precision={case['precision']}", f"data.seq_len={case['seq_len']}", "model=tiny_llama",
           "model.source=hub", f"model.path={case['model_dir']}", "eval.enabled=false"]
    if case["rank0_load"] is not None:
        out.append(f"strategy.rank0_load={str(case['rank0_load']).lower()}")
    if case["part"] == "state" and case["strategy"].startswith("zero"):
        out.append(SMALL_ZERO_BUCKETS)
    return out


def run_case(case: dict, timeout: int = 3600) -> tuple[list[dict], str | None]:
    """Both ranks' results, and why the case failed (None if it did not): the phases done before a failure are
    kept (a rank killed for memory is the old code's result at this size, not an error of the benchmark)."""
    with tempfile.TemporaryDirectory(prefix="distft-bench-scale-", dir=case["work_root"]) as tmp:
        codes = spawn_ranks(worker, case, tmp, timeout)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) if Path(tmp, f"rank{r}.json").exists()
                 else {"rank": r, "phases": {}} for r in (0, 1)]
        if all(c == 0 for c in codes):
            return ranks, None
        done = [name for name in PHASES if all(name in r["phases"] for r in ranks)]
        failed = next((name for name in PHASES if name not in done), "?")
        killed = [r for r, c in enumerate(codes) if c == -9]
        why = (f"rank {' and '.join(map(str, killed))} killed (SIGKILL: the kernel's OOM killer) during {failed}"
               if killed else f"workers exited with {codes} during {failed}")
        return ranks, why


# --- the planner beside each case ------------------------------------------------------------------------------

def planned(case: dict) -> dict:
    """Today's planner for the case's config: per-rank peaks of each phase and the host RAM per node at load."""
    sys.path.insert(0, str(REPO))
    from distft.config import compose
    from distft.plan import plan_config

    check = ["run.export_check=tensors"] if case["part"] == "state" else []  # the check the cases run
    cfg = compose(overrides(case) + check)
    mem = plan_config(cfg, model_dir=case["model_dir"]).memory
    return {"phases": mem.phases, "host_per_node_load": mem.host_per_node_load, "runtime": mem.train["runtime"],
            "notes": mem.notes, "total_params": mem.total_params}


def replanned(res: dict) -> dict:
    """The recorded run with today's planner beside it, where the case's checkpoint is here to read its shape."""
    for r in res["runs"]:
        if r["plan"] is not None and (Path(r["case"]["model_dir"]) / "config.json").exists():
            r["plan"] = planned(r["case"])
    return res


# --- driver ----------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a distft checkout before issue 13 (git worktree of b3a27a7)")
    parser.add_argument("--parts", default="load,state")
    parser.add_argument("--shape", help="run every case on this shape instead (tiny: smoke test)")
    parser.add_argument("--strategies", help="only these strategies (comma-separated)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--work-root", type=Path, default=Path(tempfile.gettempdir()) / "distft-bench-scale")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="print the tables of a recorded run and exit")
    args = parser.parse_args()
    if args.report:
        print(markdown(replanned(json.loads(args.report.read_text()))))
        return
    res = {"command": "python bench/bench_scale.py " + " ".join(sys.argv[1:]), "machine": machine(), "runs": [],
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}  # glibc's: dynamic unless set
    args.work_root.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        for shape, method, strategy, rank0_load, code in PARTS[part]:
            if args.strategies and strategy not in args.strategies.split(","):
                continue
            if code == "before" and args.before is None:
                print(f"skipped ({strategy}, before issue 13): no --before checkout", flush=True)
                continue
            shape = args.shape or shape
            model_dir = build_checkpoint(shape, args.work_root)
            case = {"part": part, "shape": shape, "method": method, "strategy": strategy, "rank0_load": rank0_load,
                    "precision": PRECISION[part], "code": code,
                    "code_dir": str(REPO if code == "today" else args.before.resolve()),
                    "model_dir": str(model_dir), "seq_len": args.seq_len, "work_root": str(args.work_root),
                    "checkpoint_file_bytes": dir_bytes(model_dir)}
            t0 = time.time()
            ranks, failed = run_case(case)
            res["runs"].append({"case": case, "ranks": ranks, "plan": planned(case) if code == "today" else None,
                                "wall_seconds": time.time() - t0, "failed": failed})
            print(f"{part}: {strategy} {method} {code} (rank0_load={rank0_load}): {time.time() - t0:.0f} s"
                  + (f" — FAILED: {failed}" if failed else ""), flush=True)
            if args.out:  # keep what is done if a later case fails
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _pair(values) -> str:
    return " / ".join(_gib(v) for v in values)


def markdown(res: dict) -> str:
    """The tables of docs/benchmarks.md "Loading at scale". The planner's figures are shown above its CPU runtime
    term (the Python process before any model), as the measurements are above each process's pre-load baseline."""
    lines = []
    loads = [r for r in res["runs"] if r["case"]["part"] == "load"]
    states = [r for r in res["runs"] if r["case"]["part"] == "state"]
    if loads:
        c = loads[0]["case"]
        lines += [f"Loading `{c['shape']}` ({c['checkpoint_file_bytes'] / GiB:.1f} GiB of bf16 safetensors), LoRA, "
                  "2 workers. Peak RSS in GiB above each process's pre-load baseline, rank 0 / rank 1, the planner's "
                  "figure in brackets; node = the sum over the ranks of each one's larger peak (the planner's host "
                  "RAM per node at load).", "",
                  "| strategy | code | load path | peak RSS (planner): load_model + method | prepare | node | "
                  "seconds |", "|---|---|---|---|---|---|---|"]
        lines += [_load_row(r) for r in loads]
    if states:
        c = states[0]["case"]
        lines += ["", f"Training state of `{c['shape']}`, full fine-tuning in fp32, 2 workers. Peak RSS of each phase "
                  "in GiB above the pre-load baseline, rank 0 / rank 1; steady = RSS after the training step; the "
                  "planner's figure for the phase beside it.", "",
                  "| strategy | code | step peak (planner) | steady | save: seconds, size | save peak (÷ steady) | "
                  "planner | restore: seconds, peak | export: seconds, size, check | export peak | planner |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_state_row(r) for r in states]
    failed = [r for r in res["runs"] if r.get("failed")]
    if failed:
        lines += [""] + [f"- {r['case']['strategy']} ({r['case']['code']}, {r['case']['part']}): {r['failed']}"
                         for r in failed]
    return "\n".join(lines)


def _phase(r: dict, name: str, key: str) -> list[float] | None:
    values = [x["phases"].get(name, {}).get(key) for x in r["ranks"]]
    return None if None in values else values


def _planned(r: dict, phase: str) -> list[float] | None:
    """The planner's peaks of `phase` for rank 0 and rank 1 above its runtime term (None: no prediction)."""
    plan = r["plan"]
    if plan is None or phase not in plan["phases"]:
        return None
    return [plan["phases"][phase][role] - plan["runtime"] for role in ("rank0", "other")]


def _beside(measured: list[float] | None, planned: list[float] | None) -> str:
    if measured is None:
        return "-"
    if planned is None:
        return _pair(measured)
    return " / ".join(f"{m / GiB:.2f} ({p / GiB:.2f})" for m, p in zip(measured, planned, strict=True))


def _load_row(r: dict) -> str:
    c, plan = r["case"], r["plan"]
    load, prepare = _phase(r, "load", "peak_rss"), _phase(r, "prepare", "peak_rss")
    path = {"ddp": "every rank"}.get(c["strategy"], "streamed by layer")
    if c["rank0_load"] is False:
        path = "every rank"
    elif c["code"] == "before":
        path = {"fsdp": "rank 0 reads all", "zero3": "zero.Init, rank 0 reads all"}.get(c["strategy"], path)
    planned_node = None if plan is None else plan["host_per_node_load"] - 2 * plan["runtime"]
    if load is None or prepare is None:
        return f"| {c['strategy']} | {c['code']} | {path} | {r['failed']} | | | |"
    node = sum(max(a, b) for a, b in zip(load, prepare, strict=True))
    seconds = max(_phase(r, "load", "seconds")) + max(_phase(r, "prepare", "seconds"))
    node_cell = f"**{_gib(node)}**" + (f" ({_gib(planned_node)})" if planned_node is not None else "")
    return (f"| {c['strategy']} | {c['code']} | {path} | {_beside(load, _planned(r, 'load'))} | "
            f"{_beside(prepare, _planned(r, 'prepare'))} | {node_cell} | {seconds:.0f} |")


def _state_row(r: dict) -> str:
    c, r0 = r["case"], r["ranks"][0]
    steady, save = _phase(r, "step", "rss_after"), _phase(r, "save", "peak_rss")
    cells = [c["strategy"], c["code"], _beside(_phase(r, "step", "peak_rss"), _planned(r, "train")),
             _pair(steady) if steady else "-"]
    if save:
        ratio = max(a / b for a, b in zip(save, steady, strict=True))
        cells += [f"{max(_phase(r, 'save', 'seconds')):.0f} s, {_gib(r0.get('checkpoint_bytes'))}",
                  f"{_pair(save)} ({ratio:.2f}×)"]
    else:
        cells += ["-", "-"]
    cells.append(_pair(_planned(r, "save")) if _planned(r, "save") else "-")
    restore = _phase(r, "restore", "peak_rss")
    cells.append(f"{max(_phase(r, 'restore', 'seconds')):.0f} s, {_beside(restore, _planned(r, 'restore'))}"
                 if restore else "-")
    export = _phase(r, "export", "peak_rss")
    if export:
        cells += [f"{max(_phase(r, 'export', 'seconds')):.0f} s, {_gib(r0['export_bytes'])}, "
                  f"{r0['export_check_mode']}", _pair(export)]
    else:
        cells += [f"**{r['failed']}**" if r.get("failed") else "-", "-"]
    cells.append(_pair(_planned(r, "export")) if _planned(r, "export") else "-")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
