"""Loss curves of a fixed set of short runs, to show that a change which should not alter the math does not.

Five tiny-Llama runs on 2 Ray CPU workers through the real `distft.launch.launch` path (DDP LoRA with eval and
export, FSDP full, ZeRO-3 LoRA, DDP QLoRA, ZeRO-2 full with gradient accumulation) and one in-process run of
`distft.recipe.run_training` (world size 1, no Ray). Records every step's loss, grad norm, lr and answer tokens, the
evaluations and the export checks. Run it at two commits and compare; on CPU they must be identical:

    python bench/numerics_check.py --out /tmp/after.json
    git worktree add /tmp/before <commit> && (cd /tmp/before && python bench/numerics_check.py --out /tmp/before.json)
    python bench/numerics_check.py --diff /tmp/before.json /tmp/after.json

(The script runs the checkout it sits in: run the copy inside the worktree for the other commit, with
PYTHONPATH=<that checkout> so that Ray's workers import it too. Commits before the layering change lack this script:
copy it there.) About 5 minutes on 2 cores. `--plan` records the planner's output instead (predictions, notes,
throughput, alternatives, the rendered plan) for 378 configs — every model preset x method x strategy x three
settings — in about 3 minutes, no Ray.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "ddp-lora-eval-export": ("lora", ["strategy=ddp"]),
    "fsdp-full": ("full", ["strategy=fsdp"]),
    "zero3-lora": ("lora", ["strategy=zero3"]),
    "ddp-qlora": ("qlora", ["strategy=ddp", "eval.at_start=false"]),
    "zero2-full-accum": ("full", ["strategy=zero2", "trainer.micro_batch_size=1"]),
}
FIELDS = ("status", "curve", "eval", "eval_start", "export_check", "trainable")


def _has_hook(module: str) -> bool:
    import importlib

    try:
        return hasattr(importlib.import_module(module), "quiet_local_workers")
    except ImportError:
        return False


def run_cases(root: Path, only: list[str]) -> dict:
    import ray

    from tests.conftest import GSM8K_DIR
    from tests.integration.conftest import PARITY, run_tiny

    # where the hook lives at the commit under test: distft.ray_hooks, distft.launch before it, distft.train before
    # the layering change
    module = next((m for m in ("distft.ray_hooks", "distft.launch") if _has_hook(m)), "distft.train")
    hook = f"{module}.quiet_local_workers"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": hook})
    out = {}
    for name in only or CASES:
        method, overrides = CASES[name]
        started = time.time()
        if name not in ("ddp-lora-eval-export", "ddp-qlora"):
            overrides = [*overrides, *PARITY]
        summary = run_tiny(root, GSM8K_DIR, name, method, *overrides)
        out[name] = _record(summary, Path(summary["run_dir"]))
        out[name]["seconds"] = time.time() - started  # not compared: for a rough look only
        print(name, summary["status"], f"{out[name]['seconds']:.0f} s", flush=True)
    ray.shutdown()
    return out


def run_one_process(root: Path) -> dict:
    import torch
    from omegaconf import OmegaConf

    from distft.model import resolve_model_dir
    from tests.conftest import GSM8K_DIR, compose_cfg

    cfg = compose_cfg(["+experiment=gsm8k_lora", "model=tiny_llama", "hardware=cpu", f"data.path={GSM8K_DIR}",
                       "data.max_train_examples=64", "data.seq_len=384", "trainer.max_steps=4",
                       "trainer.checkpoint_every=2", "trainer.warmup_steps=1", "trainer.lr=3e-2",
                       "trainer.progress_bar=false", "eval.loss_examples=8", "eval.gsm8k_examples=2",
                       "eval.max_new_tokens=4", "scaling.num_workers=1", "trainer.global_batch_size=8"])
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    run_dir = root / "one-process"
    run_dir.mkdir()
    try:
        from distft.recipe import RunHooks, WorkerContext, run_training

        result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=model_dir), RunHooks())
    except ImportError:  # commits before the layering change
        from distft.recipe import run_training

        result = run_training(cfg, run_dir=run_dir, model_dir=model_dir, rank=0, world=1,
                              device=torch.device("cpu"), resume_dir=None, report=lambda *a: None)
    return _record({"status": "completed", "eval": result["eval"], "eval_start": result["eval_start"],
                    "export_check": result["export_check"], "trainable_params": result["trainable_params"]}, run_dir)


def plan_outputs() -> dict:
    from distft.plan import alternatives, plan_config, predict_run
    from distft.plan.__main__ import local_model_dir, render
    from tests.conftest import compose_cfg

    out = {}
    for model, hardware in [("llama2_7b", []), ("llama2_13b", []), ("llama2_70b", []),
                            ("llama2_7b", ["hardware=gpu_1x"]), ("smollm2_135m", ["hardware=cpu"]),
                            ("tiny_llama", ["hardware=cpu"])]:
        for method in ("full", "lora", "qlora"):
            for strategy in ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload"):
                for extra in ([], ["trainer.gradient_checkpointing=true", "trainer.micro_batch_size=2"],
                              ["eval.enabled=false", "run.export=false", "strategy.rank0_load=false"]):
                    overrides = [f"+experiment=gsm8k_{method}", f"model={model}", *hardware,
                                 f"strategy={strategy}", *extra]
                    cfg = compose_cfg(overrides)
                    model_dir = local_model_dir(cfg)
                    plan = plan_config(cfg, model_dir=model_dir)
                    record = {"predict": predict_run(cfg, model_dir=model_dir), "tps": plan.tokens_per_second,
                              "fpt": plan.flops_per_token, "notes": plan.memory.notes, "need": plan.need_bytes}
                    if strategy == "ddp" and not extra:
                        record["alts"] = [[o, a.peak_bytes] for o, a in alternatives(cfg, shape=plan.shape, top=5)]
                        record["render"] = render(cfg, plan, tokens=None, alts=[])
                    out[" ".join(overrides)] = record
    return out


def _record(summary: dict, run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"status": summary["status"], "trainable": summary["trainable_params"],
            "curve": [[r["step"], r["loss"], r["grad_norm"], r["lr"], r["answer_tokens"]] for r in rows],
            "eval": summary["eval"], "eval_start": summary["eval_start"], "export_check": summary["export_check"]}


def diff(before: dict, after: dict) -> int:
    if "plan" in before:
        differ = [k for k in before["plan"] if before["plan"][k] != after.get("plan", {}).get(k)]
        print(f"{len(before['plan'])} planner configs: " + (f"{len(differ)} differ, e.g. {differ[:3]}" if differ
                                                               else "all identical"))
        return 1 if differ else 0
    differ = 0
    for name in before:
        for field in FIELDS:
            same = name in after and before[name][field] == after[name][field]
            differ += not same
            print(f"{name:<22} {field:<12} {'identical' if same else 'DIFFERENT'}")
    print("all identical" if not differ else f"{differ} field(s) differ")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the curves here")
    p.add_argument("--only", nargs="*", default=[], choices=[*CASES, "one-process"])
    p.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    p.add_argument("--plan", action="store_true", help="record the planner's outputs instead of training curves")
    args = p.parse_args()
    if args.diff:
        return diff(*(json.loads(path.read_text()) for path in args.diff))
    if args.plan:
        args.out.write_text(json.dumps({"plan": plan_outputs()}, indent=1, sort_keys=True, default=str))
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="distft-numerics-") as tmp:
        ray_cases = [c for c in args.only if c != "one-process"]
        result = run_cases(Path(tmp), ray_cases) if ray_cases or not args.only else {}
        if not args.only or "one-process" in args.only:
            result["one-process"] = run_one_process(Path(tmp))
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
