"""`python -m distft.plan +experiment=gsm8k_lora [overrides] [--top N] [--json] [--no-count] [--help]`

Composes the same Hydra config as `python -m distft.train` (same overrides, same validation), then prints per-worker
memory by component and phase, whether it fits, throughput, time and cost per epoch, and the best feasible
alternatives for the same model and worker count as Hydra overrides. Reads no weights and needs no hub or GPU.
"""

import argparse
import json
import sys
from pathlib import Path

from distft.errors import UserError
from distft.plan import GiB, Plan, alternatives, gpus_per_node, plan_config, prediction
from distft.plan.throughput import dataset_tokens


def compose(overrides: list[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distft.config import compose as compose_config

    try:
        return compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"cannot compose the config: {e}") from e


def prepared_embedded(marker: str) -> str | None:
    """The embedded model's prepared directory, if it holds `marker` already (nothing is prepared here)."""
    from distft.model import EMBEDDED_NAME, cache_dir

    d = cache_dir() / "models" / EMBEDDED_NAME
    return str(d) if (d / marker).exists() else None


def local_model_dir(cfg) -> str | None:
    """A directory with this model's config.json if one exists here already (nothing is prepared). None for a
    random-init model: its shape is the one in `model.*`."""
    if cfg.model.source == "embedded":
        return prepared_embedded("config.json")
    if cfg.model.source == "random":
        return None
    path = cfg.model.get("path")
    return path if path and Path(path).is_dir() else None


def local_tokenizer_dir(cfg) -> str | None:
    """A directory with this model's tokenizer if one exists here already (for counting the epoch's tokens)."""
    if cfg.model.source == "random":
        if cfg.model.tokenizer in (None, "embedded"):
            return prepared_embedded("tokenizer_config.json")
        return cfg.model.tokenizer if Path(cfg.model.tokenizer).is_dir() else None
    return local_model_dir(cfg)


def gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def duration(seconds: float) -> str:
    """Hours with two decimals, or minutes / seconds for a run shorter than that."""
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds:.2g} s"


def render(cfg, plan: Plan, *, tokens: tuple[int, str] | None, alts: list) -> str:
    mem, t, s = plan.memory, cfg.trainer, plan.settings
    out = []
    device = f"{cfg.hardware.gpu_memory_gb:g} GiB GPU" if plan.accelerator == "cuda" else "CPU"
    out.append(f"distft plan: {s['model']} · {s['method']} · {s['strategy']} · {plan.world} workers × {device} · "
               f"micro-batch {t.micro_batch_size} × seq {cfg.data.seq_len} · {t.precision} · activation "
               f"checkpointing {'on' if t.gradient_checkpointing else 'off'}")
    lora = f"; LoRA r={cfg.method.lora_r} on {list(cfg.method.target_modules)}: {mem.lora_params:,}" \
        if mem.lora_params else ""
    out.append(f"parameters: {mem.total_params:,} total, {mem.trainable_params:,} trainable{lora}")
    out.append("")
    out.append("memory per worker, training step (GiB)")
    labels = {"weights": "weights", "lora": "LoRA parameters", "autocast_cache": "autocast bf16 weight copies",
              "gradients": "gradients",
              "optimizer": "optimizer states", "sharding_buffers": "sharding / communication buffers",
              "activations": "activations", "optimizer_step": "optimizer step beyond the activations",
              "runtime": "runtime (CPU process baseline)",
              "checkpoint_file": "mapped weights file (CPU)"}
    for key, label in labels.items():
        if key in ("autocast_cache", "optimizer_step") and not mem.train.get(key):
            continue
        out.append(f"  {label:<34} {gib(mem.train.get(key, 0)):>9}")
    out.append(f"  {'total':<34} {gib(sum(mem.train.values())):>9}")
    out.append("")
    out.append("activations by micro-batch and sequence length (GiB): without / with activation checkpointing")
    out.append("  " + activation_table(cfg, plan))
    out.append("")
    out.append("peak per worker by phase (GiB)        rank 0    others")
    names = {"load": "load", "prepare": "prepare (wrap / shard)", "train": "train step", "eval": "eval / generation",
             "save": "checkpoint save", "export": "export (write + check)",
             "restore": "resume from a checkpoint"}
    for phase, peaks in mem.phases.items():
        out.append(f"  {names[phase]:<34} {gib(peaks['rank0']):>8} {gib(peaks['other']):>9}")
    out.append(f"  peak: {gib(plan.peak_bytes)} GiB in phase '{mem.peak_phase}'")
    for note in mem.notes:
        out.append(f"  note: {note}")
    if plan.accelerator == "cuda":
        out.append(f"  + CUDA context and allocator overhead → needs {gib(plan.need_bytes)} GiB of "
                   f"{gib(plan.capacity_bytes)} GiB: {verdict(plan.fits)}")
        per_node = gpus_per_node(cfg)
        host = f"{gib(mem.host_per_node_load)} GiB ({per_node} worker{'s' if per_node > 1 else ''} per node)"
        limit = f" of {cfg.hardware.host_memory_gb:g} GiB" if cfg.hardware.host_memory_gb else \
            " (set hardware.host_memory_gb to check it)"
        out.append(f"host RAM per node at load: {host}{limit}")
        out.append(f"host RAM per node when resuming: {gib(mem.host_per_node_restore)} GiB (the checkpoint's "
                   "optimizer partitions or weights as read, and offloaded states)")
    else:
        out.append(f"  {plan.world} workers on this machine: {gib(plan.need_bytes)} GiB each, "
                   f"{gib(plan.capacity_bytes)} GiB available per worker: {verdict(plan.fits)}")
    out.append("")
    out.append(f"throughput: {plan.flops_per_token / 1e9:.2f} GFLOP per token "
               f"({'6N' if s['method'] == 'full' else '4N + 6·LoRA'} + attention"
               f"{', + recompute' if t.gradient_checkpointing else ''})")
    if plan.tokens_per_second:
        out.append(f"  {plan.tokens_per_second:,.0f} tokens/s over {plan.world} workers ({plan.throughput_source})")
    else:
        out.append(f"  tokens/s: {plan.throughput_source}")
    if tokens:
        n, how = tokens
        out.append(f"  one epoch: {n:,} tokens ({how})")
        run_tokens = (t.max_steps * t.global_batch_size * cfg.data.seq_len) if t.max_steps else n * t.epochs
        for label, count in (("per epoch", n), ("this run" + (f" ({t.max_steps} steps)" if t.max_steps
                                                               else f" ({t.epochs} epochs)"), run_tokens)):
            if plan.tokens_per_second and count:
                seconds = count / plan.tokens_per_second
                cost = f", ${seconds / 3600 * plan.world * cfg.hardware.gpu_hour_usd:,.2f}" \
                    if cfg.hardware.gpu_hour_usd is not None else " (set hardware.gpu_hour_usd for cost)"
                out.append(f"  {label}: {duration(seconds)}{cost}")
    out.append("")
    out.append(f"best feasible alternatives ({s['model']}, {plan.world} workers), fastest first:")
    if not alts:
        out.append("  none fits: more workers, a larger GPU, or a smaller model")
    previous, ties = None, False
    for overrides, alt in alts:
        if alt.tokens_per_second:
            speed = f"{alt.tokens_per_second:,.0f} tok/s"
        else:
            speed = f"{alt.flops_per_token / 1e9:.2f} GFLOP/token"
        if speed == previous:
            speed, ties = "tie", True  # the estimate has no basis to tell these apart
        else:
            previous = speed
        out.append(f"  {gib(alt.peak_bytes):>7} GiB  {speed:>16}  {' '.join(overrides)}")
    if ties:
        out.append("  tie: the same estimate as the row above. Speeds differ only by FLOPs per token and offload "
                   "transfers (communication and micro-batch efficiency are not modelled: docs/planner.md); ties are "
                   "ordered by larger micro-batch, then smaller peak")
    return "\n".join(out)


def verdict(fits: bool | None) -> str:
    return {True: "FITS", False: "DOES NOT FIT", None: "unknown (set hardware.gpu_memory_gb)"}[fits]


def activation_table(cfg, plan: Plan) -> str:
    from distft.plan.memory import activation_bytes

    m = cfg.method
    seqs = sorted({256, 512, 1024, 2048, cfg.data.seq_len})
    rows = ["micro \\ seq " + "".join(f"{s:>16}" for s in seqs)]
    for mb in sorted({1, 2, 4, 8, cfg.trainer.micro_batch_size}):
        cells = []
        for seq in seqs:
            both = [activation_bytes(plan.shape, method=m.name, micro_batch_size=mb, seq_len=seq,
                                     act_bytes=2 if cfg.trainer.precision == "bf16" else 4,
                                     packing=cfg.data.packing, gradient_checkpointing=gc, lora_r=m.lora_r,
                                     lora_dropout=m.lora_dropout, target_modules=list(m.target_modules),
                                     loss_chunk_tokens=cfg.trainer.loss_chunk_tokens)
                    for gc in (False, True)]
            cells.append(f"{gib(both[0])} / {gib(both[1])}")
        rows.append(f"{mb:>11} " + "".join(f"{c:>16}" for c in cells))
    return "\n  ".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distft.plan",
        description="Per-worker memory, fit, throughput, time and cost of a distft.train config, and the best "
                    "feasible alternatives; reads no weights and needs no hub or GPU.",
        epilog="example: python -m distft.plan +experiment=gsm8k_full model=llama2_13b hardware.gpu_memory_gb=40")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="Hydra overrides, the same as for python -m distft.train (e.g. +experiment=gsm8k_lora "
                        "model=llama2_13b strategy=zero3)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="alternatives to list (default 5)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.add_argument("--no-count", action="store_true", help="do not tokenize the dataset to count an epoch's tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    if args.top < 0:
        parser().error(f"--top={args.top} must be 0 or more")
    try:
        from distft.config import validate_config
        from distft.config.validate import missing_packages

        cfg = compose(args.overrides)
        validate_config(cfg, installed=False)  # planning needs none of the optional packages
        model_dir = local_model_dir(cfg)
        plan = plan_config(cfg, model_dir=model_dir)
        tokens = None
        if not args.no_count:
            template = cfg.data.template if cfg.model.chat_template else "plain"
            tokens = dataset_tokens(name=cfg.data.name, path=cfg.data.path, tokenizer_dir=local_tokenizer_dir(cfg),
                                    seq_len=cfg.data.seq_len, packing=cfg.data.packing,
                                    limit=cfg.data.max_train_examples, template=template, hub_id=cfg.data.hub_id,
                                    system_prompt=cfg.data.system_prompt)
        alts = alternatives(cfg, shape=plan.shape, top=args.top)
    except UserError as e:
        print(f"\ndistft.plan: error: {e}\n", file=sys.stderr)
        return 2
    for problem in missing_packages(cfg):
        print(f"distft.plan: note: training this here needs more: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps({**prediction(plan), "tokens_per_second": plan.tokens_per_second,
                          "flops_per_token": plan.flops_per_token, "epoch_tokens": tokens[0] if tokens else None,
                          "alternatives": [{"overrides": o, "peak_bytes": a.peak_bytes, "fits": a.fits,
                                            "tokens_per_second": a.tokens_per_second} for o, a in alts]}, indent=2))
    else:
        print(render(cfg, plan, tokens=tokens, alts=alts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
