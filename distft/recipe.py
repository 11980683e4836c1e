"""The per-worker recipe, top to bottom: model → method → strategy → data → (resume) → loop → evaluate → export.

Ray Train runs `train_worker` on every worker. It never branches on the strategy: DDP/FSDP/DeepSpeed differences
live behind `distft.strategy.Strategy`.
"""

import json
import logging
import math
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distft import dist, preemption
from distft.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from distft.data import ShardedBatches, build_rows, format_prompt, load_examples
from distft.eval import gold_answer, greedy_generate, score
from distft.export import export_model, merge_adapter, verify_export
from distft.methods import apply_method, quantization_config
from distft.model import count_params, load_model, load_tokenizer
from distft.strategy import build_strategy
from distft.tracking import MetricsFile, WandbLogger

log = logging.getLogger("distft")

# Test hook: "STEP:RANK[:MODE]" makes that rank fail once when it reaches STEP. MODE: kill (default, the process
# exits), sigterm (the process sends itself SIGTERM, as a preemption would), nan (the loss of that step is NaN),
# sleep (a 60 s pause, so that a test can take a node away mid-run).
FAULT_ENV = "DISTFT_FAULT_AT_STEP"


def train_worker(config: dict) -> None:
    """Entry point that Ray Train calls on each worker."""
    import ray
    import ray.train

    from distft.storage import RunStorage

    ctx = ray.train.get_context()
    cfg = OmegaConf.create(config["cfg"])
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    storage = RunStorage(cfg.run.storage_path, cfg.run.name)
    checkpoint, name_suffix, resume_warning = choose_resume_checkpoint(ray.train.get_checkpoint(), storage=storage,
                                                        explicit=cfg.run.resume_from)
    if rank == 0 and checkpoint is not None:
        storage.pull("metrics.jsonl")  # a new node's staging copy may be missing or stale
    driver_stop = preemption.poll_stop_actor(cfg.run.name) if rank == 0 else (lambda: None)
    nodes = len(set(dist.all_gather_objects(ray.get_runtime_context().get_node_id())))
    preemption.training_started()
    try:
        with (checkpoint.as_directory() if checkpoint else _nullpath()) as ckpt_path:
            run_training(cfg, run_dir=storage.local_dir, model_dir=config["model_dir"], rank=rank, world=world,
                         device=device, resume_dir=Path(ckpt_path) if ckpt_path else None,
                         report=lambda metrics, ckpt_dir, step: _ray_report(metrics, ckpt_dir, step, name_suffix),
                         sync=storage.push if rank == 0 else None,
                         should_stop=lambda: preemption.stop_reason() or driver_stop(),
                         resumed_from=_checkpoint_location(checkpoint, storage), worker_nodes=nodes,
                         resume_warning=resume_warning, plan=config.get("plan"),
                         fetch_checkpoint=lambda step: _stored_checkpoint(storage, step, name_suffix))
    finally:
        preemption.training_finished()


def choose_resume_checkpoint(handed, *, storage, explicit: str | None):
    """The checkpoint to resume from: the one Ray hands over (its latest committed one) when it is complete;
    otherwise the newest complete `checkpoint_*` of this run, with a warning. Rank 0 decides and broadcasts, so
    every rank loads the same one.

    Returns (checkpoint or None, suffix for the names of the checkpoints this attempt writes, warning or None).
    After a fallback, new checkpoints must not reuse the broken ones' names, or Ray's retention of the old entry
    would later delete the new directory.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    decision = _decide_resume(handed, storage=storage, explicit=explicit) if rank == 0 else None
    decision = dist.all_gather_objects(decision)[0]
    if isinstance(decision, str):  # rank 0's reason for refusing to start
        raise RuntimeError(decision)
    if decision is None:
        return None, "", None
    path, suffix, warning = decision
    if path == handed.path:
        return handed, suffix, warning
    return ray.train.Checkpoint(path, filesystem=storage.filesystem), suffix, warning


def _decide_resume(handed, *, storage, explicit: str | None):
    from distft.storage import checkpoint_sort_key, resolve_filesystem

    if handed is None:
        return None
    problem = check_checkpoint(handed.path, handed.filesystem)
    if problem is None:
        return handed.path, "", None
    if explicit is not None:
        _, explicit_path = resolve_filesystem(explicit)
        if explicit_path.rstrip("/") == handed.path.rstrip("/"):
            return f"run.resume_from={explicit} is not a complete checkpoint: {problem}"
    handed_key = checkpoint_sort_key(handed.path.rstrip("/").rsplit("/", 1)[-1])
    for name in storage.checkpoint_dirs():  # newest first; only ones older than the broken one
        path = f"{storage.fs_path}/{name}"
        if checkpoint_sort_key(name) >= handed_key:
            continue
        if check_checkpoint(path, storage.filesystem) is None:
            warning = f"the latest checkpoint {handed.path} is incomplete ({problem}); resumed from the newest " \
                      f"complete one, {path}"
            log.warning(warning)
            return path, f"-r{int(time.time())}", warning
    return (f"the latest checkpoint {handed.path} is incomplete ({problem}) and no complete checkpoint_* is left "
            f"in {storage.uri}; start a new run.name, or pass run.resume_from=PATH_TO_A_GOOD_CHECKPOINT")


def _checkpoint_location(checkpoint, storage) -> str | None:
    if checkpoint is None:
        return None
    if storage.remote and checkpoint.path.startswith(storage.fs_path):
        return storage.uri + checkpoint.path[len(storage.fs_path):]
    return checkpoint.path


def _stored_checkpoint(storage, step: int, name_suffix: str):
    """The checkpoint of `step` as Ray persisted it, at its storage location (a local path, or a URI that is
    downloaded while the context is open) — what a restarted run would load."""
    import ray.train

    name = f"checkpoint_{step:06d}{name_suffix}"
    return ray.train.Checkpoint(f"{storage.fs_path}/{name}", filesystem=storage.filesystem), storage.location(name)


def _ray_report(metrics: dict, ckpt_dir: Path, step: int, name_suffix: str = "") -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                     checkpoint_dir_name=f"checkpoint_{step:06d}{name_suffix}")


class _nullpath:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_dtype(method: str, precision: str) -> str:
    """Full fine-tuning keeps fp32 master weights (autocast does the bf16 math); frozen LoRA bases load in the
    compute precision to halve their memory."""
    return "fp32" if method == "full" else precision


def run_training(cfg, *, run_dir: Path, model_dir: str, rank: int, world: int, device: torch.device,
                 resume_dir: Path | None, report, plan: dict | None = None, sync=None, should_stop=None, resumed_from: str | None = None,
                 worker_nodes: int | None = None, resume_warning: str | None = None,
                 fetch_checkpoint=None) -> dict:
    """The whole run on one worker. `sync(*names)` uploads files of run_dir to the run's storage (rank 0; None when
    run_dir is the storage); `should_stop()` returns a reason to checkpoint and stop at the next step boundary;
    `fetch_checkpoint(step)` returns (ray.train.Checkpoint, location) of a checkpoint this run reported (preflight)."""
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    trainer, method = cfg.trainer, cfg.method
    precision = trainer.precision
    compute_dtype = method.compute_dtype or precision
    preflight = bool(cfg.get("preflight", False))  # one step, save, reload, report memory, stop
    memory_at_start = dist.current_memory_bytes(device)  # the runtime before any model: the planner's CPU baseline
    memory = dist.PhasePeaks(device, "load")  # peaks per phase, next to the planner's phases

    # --- model and method ---------------------------------------------------------------------------------
    torch.manual_seed(trainer.seed)  # identical LoRA init on every rank
    tokenizer = load_tokenizer(model_dir, revision=cfg.model.revision)
    quant = None
    if method.name == "qlora":
        quant = quantization_config(quant_type=method.quant_type, double_quant=method.double_quant,
                                    compute_dtype=compute_dtype, quant_storage=method.quant_storage)
    weights_dtype = load_dtype(method.name, compute_dtype if quant else precision)
    accum = trainer.global_batch_size // (trainer.micro_batch_size * world)
    strategy = build_strategy(cfg.strategy.name, device=device, precision=precision,
                              micro_batch_size=trainer.micro_batch_size, grad_accum=accum,
                              options=OmegaConf.to_container(cfg.strategy, resolve=True))
    # The strategy decides which ranks read the weights (sharded strategies: rank 0 only, see `load_model`).
    model = strategy.load_model(partial(load_model, model_dir, dtype=weights_dtype,
                                        quantization_config=quant, device=device,
                                        attn_implementation=cfg.model.attn_implementation,
                                        revision=cfg.model.revision),
                                rank=rank, quantized=quant is not None)
    model = apply_method(model, name=method.name, lora_r=method.lora_r, lora_alpha=method.lora_alpha,
                         lora_dropout=method.lora_dropout, target_modules=list(method.target_modules),
                         gradient_checkpointing=trainer.gradient_checkpointing)
    trainable_params, total_params = count_params(model)

    # --- data ---------------------------------------------------------------------------------------------
    template = cfg.data.template if cfg.model.chat_template else "plain"
    data_kwargs = dict(name=cfg.data.name, path=cfg.data.path, tokenizer=tokenizer, template=template,
                       seq_len=cfg.data.seq_len, hub_id=cfg.data.hub_id, system_prompt=cfg.data.system_prompt)
    train_rows, data_stats = build_rows(split="train", packing=cfg.data.packing,
                                        limit=cfg.data.max_train_examples, **data_kwargs)
    batches = ShardedBatches(train_rows, micro_batch_size=trainer.micro_batch_size, rank=rank, world_size=world,
                             seed=trainer.seed, shuffle=True, pad_id=tokenizer.pad_token_id)
    steps_per_epoch = len(batches) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_rows)} training rows cannot fill one step of trainer.global_batch_size="
            f"{trainer.global_batch_size}; lower the batch size or add data"
        )
    max_steps = trainer.max_steps or trainer.epochs * steps_per_epoch

    # --- strategy, optimizer, schedule --------------------------------------------------------------------
    lr = trainer.lr if trainer.lr is not None else method.default_lr
    warmup = trainer.warmup_steps if trainer.warmup_steps is not None else math.ceil(trainer.warmup_ratio * max_steps)
    memory.switch("prepare")  # wrapping, optimizer states, DeepSpeed's buckets (no phase of the plan's own)
    strategy.prepare(
        model,
        build_optimizer=lambda params: torch.optim.AdamW(params, lr=lr, betas=tuple(trainer.betas), eps=trainer.eps,
                                                         weight_decay=trainer.weight_decay),
        build_scheduler=lambda opt: build_scheduler(opt, trainer.lr_schedule, warmup, max_steps, trainer.min_lr_ratio),
    )

    # --- resume -------------------------------------------------------------------------------------------
    step = 0
    if resume_dir is not None:
        problem = check_checkpoint(resume_dir)
        if problem:
            raise RuntimeError(f"Ray handed this run an incomplete checkpoint: {problem}")
        state = load_checkpoint(resume_dir, strategy=strategy, rank=rank, world_size=world)
        step = state["step"]
        batches.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", resume_dir, step)
    else:
        torch.manual_seed(trainer.seed + 1000 * (rank + 1))  # per-rank dropout stream; a resume restores it instead

    # --- tracking (rank 0) --------------------------------------------------------------------------------
    metrics = wandb = None
    if rank == 0:
        metrics = MetricsFile(run_dir / "metrics.jsonl", resume_step=step)
        if cfg.logger.name == "wandb":
            wandb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                                tags=list(cfg.logger.tags), mode=cfg.logger.mode, run_name=cfg.run.name,
                                run_dir=run_dir, config=OmegaConf.to_container(cfg), resume=resume_dir is not None)
    eval_examples = load_examples(cfg.data.name, cfg.data.path, "test", hub_id=cfg.data.hub_id,
                                  limit=_max_limit(cfg.eval), system_prompt=cfg.data.system_prompt) \
        if cfg.eval.enabled else []

    def evaluate_now() -> dict:
        return evaluate(strategy, tokenizer, eval_examples, cfg=cfg, template=template, rank=rank, world=world,
                        device=device)

    eval_start = None
    if cfg.eval.enabled and cfg.eval.at_start and step == 0:
        with memory.during("eval"):
            eval_start = evaluate_now()
        if rank == 0:
            _write_json(run_dir / "eval_start.json", eval_start)
            _sync(sync, "eval_start.json")

    # --- loop ---------------------------------------------------------------------------------------------
    stream = batches.forever()
    fault = _fault_step(rank)
    model.train()
    memory.switch("train")
    step_times: list[float] = []
    step_tokens: list[int] = []
    stopped = None
    bar = _progress_bar(max_steps, step) if rank == 0 and trainer.progress_bar else None
    while step < max_steps:
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(accum)]
        global_tokens = dist.all_reduce(sum(b["num_loss_tokens"] for b in micro), device)
        # Each micro-batch's summed token loss is divided by the answer tokens of the whole global batch, so any
        # micro-batch x accumulation x workers factorisation gives the same update. DDP averages over workers,
        # hence the factor `world`.
        scale = world / max(global_tokens, 1.0)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            with strategy.sync_context(sync=i == accum - 1):
                with strategy.forward_context():
                    logits = strategy.model(**_model_inputs(batch, device)).logits
                token_loss = causal_lm_loss_sum(logits, batch["labels"].to(device))
                strategy.backward(token_loss * scale)
            loss_sum += float(token_loss.detach())
        if fault == (step + 1, "nan"):
            loss_sum = float("nan")
        loss = dist.all_reduce(loss_sum, device) / max(global_tokens, 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {step + 1}; stopped before the optimizer step (no checkpoint of this step "
                "was written). Lower trainer.lr, keep trainer.max_grad_norm set, or check the data for empty answers")
        lr_now = strategy.current_lr()
        grad_norm = strategy.step(trainer.max_grad_norm)
        step += 1
        elapsed = time.perf_counter() - t0
        tokens = dist.all_reduce(sum(int(b["input_ids"].numel()) for b in micro), device)
        step_times.append(elapsed)
        step_tokens.append(tokens)
        if fault is not None and step == fault[0] and fault[1] != "nan":
            _inject_fault(run_dir, rank, step, fault[1])
        if rank == 0:
            row = {"step": step, "loss": loss, "lr": lr_now, "grad_norm": grad_norm,
                   "tokens_per_second": tokens / elapsed, "answer_tokens": int(global_tokens),
                   "epoch": batches.state_dict()["epoch"], "step_seconds": elapsed}
            if step % trainer.log_every == 0 or step == max_steps:
                metrics.log(row)
                if wandb:
                    wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
        # Every rank must agree to stop at the same step, whichever of them (or the driver) was told to.
        reason = should_stop() if should_stop else None
        if should_stop and dist.all_reduce(float(reason is not None), device, op="max") > 0:
            stopped = dist.all_gather_objects(reason)
            stopped = next((r for r in stopped if r), "stop requested")
        if step % trainer.checkpoint_every == 0 or step == max_steps or stopped or preflight:
            with memory.during("save"):
                _save_and_report(strategy, batches, run_dir, rank, world, step, cfg, report, {"loss": loss})
            _sync(sync, "metrics.jsonl")
        if stopped:
            log.warning("%s: checkpoint of step %d saved; stopping (rerun the same command to resume)", stopped, step)
            break
        if preflight:
            break
    if bar:
        bar.close()
    if stopped:
        result = {"steps": step, "max_steps": max_steps, "stopped": stopped,
                  "resumed_from": resumed_from or (str(resume_dir) if resume_dir else None)}
        if rank == 0:
            _write_json(run_dir / "train_result.json", result)
            _sync(sync, "train_result.json", "metrics.jsonl")
        return result

    if preflight:
        memory.switch("reload")
        result = _preflight_reload(strategy, checkpoint=fetch_checkpoint(step), rank=rank, world=world, step=step,
                                   device=device, memory=memory, memory_at_start=memory_at_start, loss=loss,
                                   trainable_params=trainable_params, total_params=total_params)
        if rank == 0:
            _write_json(run_dir / "train_result.json", result)
            _sync(sync, "train_result.json")
        return result

    # --- evaluate and export ------------------------------------------------------------------------------
    eval_end = None
    if cfg.eval.enabled:
        memory.switch("eval")
        eval_end = evaluate_now()
    export_dir = run_dir / "export"
    export_info = None
    if cfg.run.export:
        memory.switch("export")
        # Every rank takes part: sharded strategies gather weights collectively for both steps.
        probe = torch.tensor([train_rows[0].input_ids[:128]])
        trained_logits = probe_logits(strategy, probe, device)
        export_model(strategy, tokenizer, export_dir, rank=rank)
        dist.barrier()
        if rank == 0:
            export_info = verify_export(export_dir, probe=probe, trained_logits=trained_logits, method=method.name,
                                        dtype=weights_dtype, quant_config=quant, device=device, run_dir=run_dir,
                                        precision=precision)
            if method.merge_on_export and method.name != "full":
                merge_adapter(model_dir, export_dir, export_dir / "merged", dtype=load_dtype("lora", compute_dtype))
        dist.barrier()

    peaks, by_phase = _gather_peaks(memory)
    peak = max(peaks)
    starts = dist.all_gather_objects(memory_at_start)
    result = {
        "steps": step,
        "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch,
        "grad_accum": accum,
        "lr": lr,
        "tokens_per_second": steady_throughput(step_tokens, step_times),
        "peak_memory_bytes": int(peak),
        "peak_memory_bytes_per_worker": peaks,
        "peak_memory_bytes_by_phase": by_phase,
        "memory_at_start_bytes_per_worker": starts,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "data": data_stats,
        "eval_start": eval_start,
        "eval": eval_end,
        "export_dir": str(export_dir) if cfg.run.export else None,
        "export_check": export_info,
        "resumed_from": resumed_from or (str(resume_dir) if resume_dir else None),
        "worker_nodes": worker_nodes,
        "resume_warning": resume_warning,
    }
    if rank == 0:
        _write_json(run_dir / "train_result.json", result)
        _sync(sync, "train_result.json", "metrics.jsonl", "eval_start.json", "export_probe.pt", "export")
        if wandb:
            wandb.summary({k: v for k, v in (eval_end or {}).items() if isinstance(v, (int, float))})
            if plan:  # the planner's prediction next to what was measured, so every run checks the planner
                wandb.summary({"plan/predicted_peak_bytes": plan.get("peak_bytes"),
                               "plan/measured_peak_bytes": int(peak), "plan/fits": plan.get("fits"),
                               **{f"plan/{phase}/predicted_peak_bytes": max(p.values())
                                  for phase, p in plan.get("phases", {}).items()},
                               **{f"plan/{phase}/measured_peak_bytes": max(v) for phase, v in (by_phase or {}).items()}})
            wandb.finish()
    return result


def _preflight_reload(strategy, *, checkpoint, rank: int, world: int, step: int, device: torch.device,
                      memory: dist.PhasePeaks, memory_at_start: int, loss: float, trainable_params: int,
                      total_params: int) -> dict:
    """Preflight's second half: reload the checkpoint step 1 just saved (from the run's storage, as a restart
    would) into the strategy, check the trainable weights survived the round trip, and report memory per worker."""
    checkpoint, location = checkpoint
    dist.barrier()  # every rank has returned from ray.train.report: its files are in storage
    before = _trainable_checksum(strategy, device)
    with torch.no_grad():  # a reload must overwrite the weights: disturb them first
        for p in strategy.unwrap().parameters():
            if p.requires_grad:
                _local_tensor(p).add_(1.0)
    with checkpoint.as_directory() as ckpt_dir:  # downloaded when storage is a URI
        load_checkpoint(Path(ckpt_dir), strategy=strategy, rank=rank, world_size=world)
    after = _trainable_checksum(strategy, device)
    peaks, by_phase = _gather_peaks(memory)
    return {
        "steps": step, "preflight": True, "train_loss_first_step": loss,
        "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_worker": peaks,
        "peak_memory_bytes_by_phase": by_phase,
        "memory_at_start_bytes_per_worker": dist.all_gather_objects(memory_at_start),
        "trainable_params": trainable_params, "total_params": total_params,
        "checkpoint": location, "reloaded": True,
        "reload_checksum": {"saved": before, "reloaded": after, "equal": before == after},
    }


def _gather_peaks(memory: dist.PhasePeaks) -> tuple[list[int], dict[str, list[int]] | None]:
    """Every worker's peak of the whole run, and per phase {phase: [per worker]} (None where not measurable)."""
    gathered = dist.all_gather_objects(memory.finish())
    peaks = [peak for peak, _ in gathered]
    if any(phases is None for _, phases in gathered):
        return peaks, None
    return peaks, {phase: [phases.get(phase, 0) for _, phases in gathered] for phase in gathered[0][1]}


def _trainable_checksum(strategy, device: torch.device) -> float:
    """Sum of squares of every rank's local trainable weights (shards under ZeRO-3/FSDP), summed over ranks."""
    total = 0.0
    for p in strategy.unwrap().parameters():
        if p.requires_grad:
            total += float(_local_tensor(p).detach().double().pow(2).sum())
    return dist.all_reduce(total, device)


def _local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's shard (FSDP2), a ZeRO-3 partition, or the tensor itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def steady_throughput(tokens: list[int], seconds: list[float]) -> float | None:
    """Tokens per second over this attempt's steps, leaving out the first (it pays for warm-up)."""
    if len(seconds) > 1:
        tokens, seconds = tokens[1:], seconds[1:]
    return sum(tokens) / sum(seconds) if seconds else None


def build_scheduler(optimizer, schedule: str, warmup: int, total: int, min_lr_ratio: float):
    from transformers import get_scheduler

    name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    kwargs = {"min_lr_rate": min_lr_ratio} if schedule == "cosine" else None
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=kwargs)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of next-token predictions over answer tokens (labels != -100)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def _model_inputs(batch: dict, device: torch.device) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
              "use_cache": False}
    # Packed rows come without a mask: transformers derives a block-diagonal causal mask from position_ids.
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs


def _max_limit(eval_cfg) -> int | None:
    limits = [eval_cfg.loss_examples, eval_cfg.gsm8k_examples]
    return None if any(x is None for x in limits) else max(limits)


@torch.no_grad()
def probe_logits(strategy, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The trained model's logits on one input, computed by every rank (sharded models need all of them)."""
    model = strategy.model
    was_training = model.training
    model.eval()
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


@torch.no_grad()
def evaluate(strategy, tokenizer, examples, *, cfg, template: str, rank: int, world: int, device: torch.device) -> dict:
    """Eval loss on answer tokens and (for GSM8K) greedy-decoding accuracy, each rank on a disjoint shard.

    Every rank runs the same number of loss batches (shards are padded), so sharded models can run their
    collectives; generation runs on the model the strategy hands out for it.
    """
    from distft.data import encode_examples, pack_examples, unpacked_rows

    model = strategy.model
    was_training = model.training
    model.eval()
    out: dict = {}
    loss_examples = examples[: cfg.eval.loss_examples] if cfg.eval.loss_examples is not None else examples
    encoded, _ = encode_examples(tokenizer, loss_examples, template, cfg.data.seq_len)
    rows = pack_examples(encoded, cfg.data.seq_len, tokenizer.pad_token_id) if cfg.data.packing else unpacked_rows(encoded)
    loader = ShardedBatches(rows, micro_batch_size=cfg.trainer.micro_batch_size, rank=rank, world_size=world,
                            seed=0, shuffle=False, pad_id=tokenizer.pad_token_id, pad_to_equal=True)
    loss_sum = tokens = 0.0
    for batch in loader:
        with strategy.forward_context():
            logits = model(**_model_inputs(batch, device)).logits
        loss_sum += float(causal_lm_loss_sum(logits, batch["labels"].to(device)))
        tokens += batch["num_loss_tokens"]
    loss_sum, tokens = dist.all_reduce(loss_sum, device), dist.all_reduce(tokens, device)
    out["eval_loss"] = loss_sum / max(tokens, 1.0)
    out["eval_loss_examples"] = len(loss_examples)

    if cfg.data.name == "gsm8k" and cfg.eval.gsm8k_examples != 0:
        gen_examples = examples[: cfg.eval.gsm8k_examples] if cfg.eval.gsm8k_examples is not None else examples
        mine = list(range(rank, len(gen_examples), world))
        prompts = [format_prompt(tokenizer, gen_examples[i].messages, template) for i in mine]
        with strategy.generation_context() as gen_model, strategy.forward_context():
            texts = greedy_generate(gen_model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                    batch_size=cfg.eval.batch_size)
        gathered = dist.all_gather_objects(list(zip(mine, texts, strict=True)))
        by_index = dict(pair for part in gathered for pair in part)
        predictions = [by_index[i] for i in range(len(gen_examples))]
        out.update(score(predictions, [gold_answer(e.response) for e in gen_examples]))
        out["samples"] = [{"question": gen_examples[i].messages[-1]["content"], "output": predictions[i]}
                          for i in range(min(3, len(gen_examples)))]
    model.train(was_training)
    return out


def _save_and_report(strategy, batches, run_dir, rank, world, step, cfg, report, metrics) -> None:
    info = {"method": cfg.method.name, "strategy": cfg.strategy.name, "model": cfg.model.name}
    with tempfile.TemporaryDirectory(prefix="distft-ckpt-") as tmp:
        save_checkpoint(Path(tmp), strategy=strategy, rank=rank, world_size=world, step=step,
                        loader_state=batches.state_dict(), info=info)
        report({"step": step, **metrics}, Path(tmp), step)


def _sync(sync, *names: str) -> None:
    if sync is not None:
        sync(*names)


def _fault_step(rank: int) -> tuple[int, str] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    step, fault_rank = int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
    mode = parts[2] if len(parts) > 2 and parts[2] else "kill"
    return (step, mode) if fault_rank == rank else None


def _inject_fault(run_dir: Path, rank: int, step: int, mode: str = "kill") -> None:
    marker = run_dir / f".fault_injected_step{step}_rank{rank}"
    if marker.exists():  # only once, so the restarted attempt can pass this step
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    if mode == "sleep":  # holds the run at this step so a test can take a node away
        log.warning("%s: rank %d pauses at step %d", FAULT_ENV, rank, step)
        time.sleep(60)
        return
    if mode == "sigterm":
        import signal

        log.warning("%s: rank %d sends itself SIGTERM at step %d", FAULT_ENV, rank, step)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # let the main thread run the handler before the step boundary is checked
        return
    log.error("%s: killing rank %d at step %d", FAULT_ENV, rank, step)
    os._exit(1)


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    # Ray forwards worker output line by line, so redraw rarely rather than in place.
    return tqdm(total=total, initial=initial, desc="train", mininterval=10, ncols=100)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
