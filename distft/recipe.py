"""The per-worker recipe, top to bottom: model → method → strategy → data → resume → loop → evaluate → export.

`run_training` is what every worker runs: `distft.worker` calls it under Ray Train, a test or a benchmark calls it
in one process. It imports no Ray and never branches on the strategy: DDP/FSDP/DeepSpeed differences live behind
`distft.strategy.Strategy`.
"""

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distft import dist, loop, settings
from distft.checkpoint import Checkpointer
from distft.data import ShardedBatches, build_rows, load_examples, with_fewshot
from distft.data import steps_per_epoch as data_steps_per_epoch
from distft.eval.evaluate import evaluate
from distft.eval.tasks import get_task
from distft.export import export_and_verify, push_to_hub, write_model_card
from distft.faults import Faults
from distft.methods import apply_method, quantization_config
from distft.model import count_params, load_model, load_tokenizer
from distft.optim import build_optimizer, build_scheduler
from distft.plan.preflight import reload_check
from distft.progress import step as progress_step
from distft.settings import RunSettings, run_settings
from distft.stop import StopCheck, StopRequested
from distft.strategy import Strategy, build_strategy
from distft.tracking import MetricsFile, RunTracker, WandbLogger

log = logging.getLogger("distft")


@dataclass
class WorkerContext:
    """Where this worker stands in the run."""

    run_dir: Path  # this worker's copy of the run directory (rank 0 writes distft's files there)
    model_dir: str  # what `from_pretrained` reads: a prepared local directory or a hub id
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume_dir: Path | None = None  # the checkpoint to resume from, as a local directory
    resumed_from: str | None = None  # where that checkpoint lives, as summary.json shows it
    resume_warning: str | None = None  # an incomplete checkpoint was skipped
    worker_nodes: int | None = None
    plan: dict | None = None  # the planner's prediction, logged to W&B next to the measured peaks
    train_rows: tuple[list, dict, str] | None = None  # the training split as the driver's check built it


@dataclass
class RunHooks:
    """What the run needs from its launcher; no-ops in one process, Ray Train's under `distft.worker`."""

    report: Callable[[dict, Path, int], None] = lambda metrics, ckpt_dir, step: None  # hand a checkpoint over
    sync: Callable[..., None] | None = None  # rank 0: upload files of run_dir to the run's storage
    should_stop: Callable[[], str | None] | None = None  # a reason to stop (asked at every agreed stop point)
    fetch_checkpoint: Callable[[int], tuple] | None = None  # preflight: (checkpoint, location) of a saved step

    def upload(self, *names: str) -> None:
        if self.sync is not None:
            self.sync(*names)


@dataclass
class TrainData:
    rows: list
    stats: dict
    batches: ShardedBatches
    template: str
    steps_per_epoch: int
    max_steps: int


def run_training(cfg, ctx: WorkerContext, hooks: RunHooks | None = None) -> dict:
    """The whole run on one worker. Returns what rank 0 writes to train_result.json."""
    hooks = hooks or RunHooks()
    setup_process(cfg, ctx)
    stop = StopCheck(hooks.should_stop, ctx.device)
    try:
        return train_evaluate_export(cfg, ctx, hooks, stop)
    except StopRequested as e:  # outside the steps: nothing new to save (see distft.stop)
        return stopped_early(ctx, hooks, e, steps=stop.steps_done)


def train_evaluate_export(cfg, ctx: WorkerContext, hooks: RunHooks, stop: StopCheck) -> dict:
    memory = dist.PhasePeaks(ctx.device, "load")  # peaks per phase, next to the planner's phases
    run = run_settings(cfg, world=ctx.world)
    strategy, model, tokenizer = build_model(cfg, ctx, run)
    stop.check("loading")
    params = count_params(model)
    data = build_data(cfg, ctx, tokenizer, run)
    memory.switch("prepare")  # wrapping, optimizer states, DeepSpeed's buckets (no phase of the plan's own)
    prepare_strategy(strategy, model, cfg.trainer, lr=run.lr, max_steps=data.max_steps)
    checkpointer = Checkpointer(strategy, rank=ctx.rank, world=ctx.world, every=cfg.trainer.checkpoint_every,
                                max_steps=data.max_steps, report=hooks.report,
                                info={group: cfg[group].name for group in ("method", "strategy", "model")})
    step = stop.steps_done = resume(checkpointer, data.batches, ctx, seed=cfg.trainer.seed,
                                    global_batch_size=cfg.trainer.global_batch_size)
    stop.check("loading")
    tracker = build_tracker(cfg, ctx, resume_step=step)
    evaluate_now = build_evaluator(cfg, ctx, strategy, tokenizer, data.template, stop)
    eval_start = evaluate_at_start(cfg, ctx, hooks, evaluate_now, memory, tracker) if step == 0 else None
    trained = loop.train(strategy, data.batches, step=step, max_steps=data.max_steps, grad_accum=run.grad_accum,
                         max_grad_norm=cfg.trainer.max_grad_norm, world=ctx.world, device=ctx.device,
                         tracker=tracker, checkpointer=checkpointer, faults=Faults(ctx.rank, ctx.run_dir),
                         memory=memory, stop=stop, preflight=cfg.preflight,
                         loss_chunk_tokens=cfg.trainer.loss_chunk_tokens,
                         after_save=lambda: hooks.upload("metrics.jsonl"))
    stop.steps_done = trained.step
    if trained.stopped:
        return write_result(ctx, hooks, {"steps": trained.step, "max_steps": data.max_steps,
                                         "stopped": trained.stopped, "stopped_phase": "training",
                                         "resumed_from": resumed_from(ctx)},
                            "train_result.json", "metrics.jsonl")
    if cfg.preflight:
        return write_result(ctx, hooks, preflight(strategy, ctx, hooks, trained, memory, params), "train_result.json")
    eval_end = None
    if cfg.eval.enabled:
        memory.switch("eval")
        eval_end = record_eval(ctx, tracker, evaluate_now(label="evaluation after training"), name="eval",
                               step=trained.step)
    export_check = export(cfg, ctx, strategy, tokenizer, run, probe_row=data.rows[0], memory=memory, stop=stop)
    hub = publish(cfg, ctx, tokenizer, data.template, run, trained, eval_end, export_check)
    result = train_result(ctx, run, data, trained, memory, params, eval_start=eval_start, eval_end=eval_end,
                          export_check=export_check, exported=cfg.run.export)
    if hub is not None:
        result["hub"] = hub
    write_result(ctx, hooks, result, "train_result.json", "metrics.jsonl", "eval_start.json",
                 "eval_start_predictions.jsonl", "eval_predictions.jsonl", "export_probe.pt", "export")
    if cfg.run.export:
        tracker.log_artifact(ctx.run_dir / "export", name=f"{cfg.run.name}-export", kind="model")
    tracker.finish(summary_for_wandb(eval_end, ctx.plan, result))
    return result


def stopped_early(ctx: WorkerContext, hooks: RunHooks, stopped: StopRequested, *, steps: int) -> dict:
    """A stop while loading, evaluating or exporting. Before step 1 nothing is lost; after the last step its
    checkpoint is there, and a rerun repeats the evaluation and export (a half-written export is removed)."""
    log.warning("%s: stopping during %s, after %d steps (rerun the same command to %s)", stopped.reason,
                stopped.phase, steps, "resume" if steps else "start again")
    if ctx.rank == 0 and stopped.phase == "export":
        shutil.rmtree(ctx.run_dir / "export", ignore_errors=True)
        (ctx.run_dir / "export_probe.pt").unlink(missing_ok=True)
    return write_result(ctx, hooks, {"steps": steps, "stopped": stopped.reason, "stopped_phase": stopped.phase,
                                     "resumed_from": resumed_from(ctx)}, "train_result.json", "metrics.jsonl")


def setup_process(cfg, ctx: WorkerContext) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank{ctx.rank}] %(levelname)s %(name)s: %(message)s")
    # peft asks transformers for a deprecated property on every LoRA model: a warning per run and rank, nothing to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if ctx.rank != 0:  # every rank reads the same data: its summary is printed once, by rank 0
        logging.getLogger("distft.data").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.use_deterministic_algorithms(ctx.device.type == "cpu", warn_only=True)


def build_model(cfg, ctx: WorkerContext, run: RunSettings) -> tuple[Strategy, torch.nn.Module, object]:
    """The strategy, this rank's copy of the base model with the method applied, and the tokenizer."""
    trainer, method = cfg.trainer, cfg.method
    torch.manual_seed(trainer.seed)  # identical LoRA init on every rank
    tokenizer = load_tokenizer(ctx.model_dir, revision=cfg.model.revision)
    quant = quant_config(method, run)
    strategy = build_strategy(cfg.strategy.name, device=ctx.device, precision=trainer.precision,
                              micro_batch_size=trainer.micro_batch_size, grad_accum=run.grad_accum,
                              options=OmegaConf.to_container(cfg.strategy, resolve=True))
    # The strategy decides which ranks read the weights (sharded strategies: rank 0 only, see `load_model`).
    with progress_step(f"loading the model from {ctx.model_dir}", enabled=ctx.rank == 0):
        model = strategy.load_model(partial(load_model, ctx.model_dir, dtype=run.load_dtype,
                                            quantization_config=quant, device=ctx.device,
                                            attn_implementation=cfg.model.attn_implementation,
                                            revision=cfg.model.revision),
                                    rank=ctx.rank, quantized=quant is not None)
    model = apply_method(model, name=method.name, lora_r=method.lora_r, lora_alpha=method.lora_alpha,
                         lora_dropout=method.lora_dropout, target_modules=list(method.target_modules),
                         gradient_checkpointing=trainer.gradient_checkpointing)
    return strategy, model, tokenizer


def quant_config(method, run: RunSettings):
    """bitsandbytes' 4-bit config for QLoRA (None for full / LoRA)."""
    if not run.quantized:
        return None
    return quantization_config(quant_type=method.quant_type, double_quant=method.double_quant,
                               compute_dtype=run.compute_dtype, quant_storage=run.quant_storage)


def build_data(cfg, ctx: WorkerContext, tokenizer, run: RunSettings) -> TrainData:
    """The training rows (validated, formatted, masked, packed) and this rank's resumable batches of them."""
    trainer = cfg.trainer
    rows, stats, template = ctx.train_rows or training_rows(cfg, tokenizer)
    batches = ShardedBatches(rows, micro_batch_size=trainer.micro_batch_size, rank=ctx.rank, world_size=ctx.world,
                             seed=trainer.seed, shuffle=True, pad_id=tokenizer.pad_token_id)
    steps_per_epoch = epoch_steps(cfg, len(rows), world=ctx.world, grad_accum=run.grad_accum)
    total = settings.max_steps(max_steps=trainer.max_steps, epochs=trainer.epochs, steps_per_epoch=steps_per_epoch)
    return TrainData(rows, stats, batches, template, steps_per_epoch, total)


def training_rows(cfg, tokenizer) -> tuple[list, dict, str]:
    """The training split's rows (validated, formatted, masked, packed), their stats and the prompt template; the
    driver's precheck builds them the same way."""
    d = cfg.data
    template = d.template if cfg.model.chat_template else "plain"
    rows, stats = build_rows(name=d.name, path=d.path, split="train", tokenizer=tokenizer, template=template,
                             seq_len=d.seq_len, packing=d.packing, limit=d.max_train_examples, hub_id=d.hub_id,
                             system_prompt=d.system_prompt)
    return rows, stats, template


def epoch_steps(cfg, rows: int, *, world: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (a DataError when the rows cannot fill one)."""
    t = cfg.trainer
    return data_steps_per_epoch(rows, micro_batch_size=t.micro_batch_size, world=world, grad_accum=grad_accum,
                                global_batch_size=t.global_batch_size)


def prepare_strategy(strategy: Strategy, model: torch.nn.Module, trainer, *, lr: float, max_steps: int) -> None:
    """Wrap or shard the model and build its optimizer and schedule (the strategy owns both)."""
    warmup = settings.warmup_steps(warmup_steps=trainer.warmup_steps, warmup_ratio=trainer.warmup_ratio,
                                   total_steps=max_steps)
    strategy.prepare(
        model,
        build_optimizer=partial(build_optimizer, lr=lr, betas=tuple(trainer.betas), eps=trainer.eps,
                                weight_decay=trainer.weight_decay, name=trainer.optimizer),
        build_scheduler=partial(build_scheduler, schedule=trainer.lr_schedule, warmup=warmup, total=max_steps,
                                min_lr_ratio=trainer.min_lr_ratio),
    )


def resume(checkpointer: Checkpointer, batches: ShardedBatches, ctx: WorkerContext, *, seed: int,
           global_batch_size: int) -> int:
    """The step to start from: the resumed checkpoint's (its RNG and data position restored), else 0. A checkpoint
    of another number of workers carries its data position over when this run keeps its global batch (see
    `distft.checkpoint.load_checkpoint`)."""
    if ctx.resume_dir is None:
        torch.manual_seed(seed + 1000 * (ctx.rank + 1))  # per-rank dropout stream; a resume restores it instead
        return 0
    state = checkpointer.restore(ctx.resume_dir, batches, global_batch_size=global_batch_size)
    return state["step"]


def build_tracker(cfg, ctx: WorkerContext, *, resume_step: int) -> RunTracker:
    """Rank 0 writes metrics.jsonl (and W&B); the other ranks' tracker records nothing."""
    if ctx.rank != 0:
        return RunTracker()
    wandb = None
    if cfg.logger.name == "wandb":
        group = cfg.logger.group  # a compare's or sweep's name: its arms are `<group>/<arm>`, job type = arm
        wandb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=group,
                            tags=list(cfg.logger.tags), mode=cfg.logger.mode,
                            run_name=f"{group}/{cfg.run.name}" if group else cfg.run.name,
                            job_type=cfg.run.name if group else None, run_dir=ctx.run_dir,
                            config=OmegaConf.to_container(cfg), resume=ctx.resume_dir is not None)
    return RunTracker(MetricsFile(ctx.run_dir / "metrics.jsonl", resume_step=resume_step), wandb,
                      log_every=cfg.trainer.log_every, progress_bar=cfg.trainer.progress_bar)


def build_evaluator(cfg, ctx: WorkerContext, strategy: Strategy, tokenizer, template: str,
                    stop: StopCheck) -> Callable[..., dict]:
    """A call that evaluates the model as it is now on the test split (loaded once, here): eval loss on the first
    eval.loss_examples, the task's metric (distft.eval.tasks) on the first eval.gsm8k_examples, prompted with
    eval.fewshot solved train examples when set."""
    e, d = cfg.eval, cfg.data
    task = get_task(d.name)
    scored_n = e.gsm8k_examples if task is not None else 0
    limit = None if e.loss_examples is None or scored_n is None else max(e.loss_examples, scored_n)
    examples = load_examples(d.name, d.path, "test", hub_id=d.hub_id, limit=limit,
                             system_prompt=d.system_prompt) if e.enabled else []
    scored = examples[:scored_n]
    if e.fewshot and scored:
        train = load_examples(d.name, d.path, "train", hub_id=d.hub_id, system_prompt=d.system_prompt)
        scored = with_fewshot(scored, train, e.fewshot, e.fewshot_seed)
    return partial(evaluate, strategy, tokenizer, losses=examples[:e.loss_examples], scored=scored, task=task,
                   template=template, seq_len=d.seq_len, packing=d.packing,
                   micro_batch_size=cfg.trainer.micro_batch_size, max_new_tokens=e.max_new_tokens,
                   batch_size=e.batch_size, rank=ctx.rank, world=ctx.world, device=ctx.device, stop=stop,
                   gather=e.gather)


def evaluate_at_start(cfg, ctx: WorkerContext, hooks: RunHooks, evaluate_now, memory: dist.PhasePeaks,
                      tracker: RunTracker) -> dict | None:
    """The base model's evaluation before the first step (eval.at_start), written to eval_start.json and its
    outputs to eval_start_predictions.jsonl."""
    if not (cfg.eval.enabled and cfg.eval.at_start):
        return None
    with memory.during("eval"):
        result = evaluate_now(label="evaluation before training")
    result = record_eval(ctx, tracker, result, name="eval_start", step=0)
    if ctx.rank == 0:
        write_json(ctx.run_dir / "eval_start.json", result)
        hooks.upload("eval_start.json", "eval_start_predictions.jsonl")
    return result


def record_eval(ctx: WorkerContext, tracker: RunTracker, result: dict, *, name: str, step: int) -> dict:
    """Rank 0 writes the outputs to <name>_predictions.jsonl and logs the numbers (W&B `eval/*` at `step`); the
    result, without the outputs, goes on to summary.json."""
    result = dict(result)
    rows = result.pop("predictions", None)
    if ctx.rank == 0 and rows is not None:
        write_jsonl(ctx.run_dir / f"{name}_predictions.jsonl", rows)
    tracker.log_eval(result, step=step, prefix=name)
    if rows is not None:
        tracker.log_samples(rows, key=f"{name}/samples")
    return result


def export(cfg, ctx: WorkerContext, strategy: Strategy, tokenizer, run: RunSettings, *, probe_row,
           memory: dist.PhasePeaks, stop: StopCheck) -> dict | None:
    """export/ (run.export): a plain HF model or peft adapter, reloaded and checked against the trained logits."""
    if not cfg.run.export:
        return None
    memory.switch("export")
    method = cfg.method
    quant = quant_config(method, run)
    merge = method.merge_on_export and method.name != "full"
    stop.check("export")
    return export_and_verify(strategy, tokenizer, export_dir=ctx.run_dir / "export",
                             probe=torch.tensor([probe_row.input_ids[:128]]), rank=ctx.rank, device=ctx.device,
                             method=method.name, dtype=run.load_dtype, quant_config=quant,
                             precision=cfg.trainer.precision, run_dir=ctx.run_dir,
                             merge_base=ctx.model_dir if merge else None,
                             merge_dtype=run.compute_dtype,  # the merged base unquantised, in the compute dtype
                             check=cfg.run.export_check, stop=stop)


def publish(cfg, ctx: WorkerContext, tokenizer, template: str, run: RunSettings, trained: loop.LoopResult,
            eval_end: dict | None, export_check: dict | None) -> dict | None:
    """Rank 0: the export's model card, then the upload to run.push_to_hub when set (its outcome, for summary.json)."""
    if not cfg.run.export or ctx.rank != 0:
        return None
    export_dir = ctx.run_dir / "export"
    write_model_card(export_dir, cfg=cfg, tokenizer=tokenizer, template=template, steps=trained.step, lr=run.lr,
                     train_loss=trained.loss, metrics=eval_end, check=export_check)
    return push_to_hub(export_dir, cfg.run.push_to_hub) if cfg.run.push_to_hub else None


def preflight(strategy: Strategy, ctx: WorkerContext, hooks: RunHooks, trained: loop.LoopResult,
              memory: dist.PhasePeaks, params: tuple[int, int]) -> dict:
    """Preflight's second half: reload the checkpoint step 1 saved, as a restart would, and measure."""
    memory.switch("reload")
    reloaded = reload_check(strategy, checkpoint=hooks.fetch_checkpoint(trained.step), rank=ctx.rank,
                            world=ctx.world, device=ctx.device)
    return {"steps": trained.step, "preflight": True, "train_loss_first_step": trained.loss,
            **memory_result(memory), **params_result(params), **reloaded}


def train_result(ctx: WorkerContext, run: RunSettings, data: TrainData, trained: loop.LoopResult,
                 memory: dist.PhasePeaks, params: tuple[int, int], *, eval_start: dict | None,
                 eval_end: dict | None, export_check: dict | None, exported: bool) -> dict:
    """train_result.json of a finished run (collective: the memory peaks are gathered from every rank)."""
    return {"steps": trained.step, "max_steps": data.max_steps, "steps_per_epoch": data.steps_per_epoch,
            "grad_accum": run.grad_accum, "lr": run.lr, "tokens_per_second": trained.tokens_per_second,
            **memory_result(memory), **params_result(params), "data": data.stats,
            "eval_start": eval_start, "eval": eval_end,
            "export_dir": str(ctx.run_dir / "export") if exported else None, "export_check": export_check,
            "resumed_from": resumed_from(ctx), "worker_nodes": ctx.worker_nodes,
            "resume_warning": ctx.resume_warning}


def memory_result(memory: dist.PhasePeaks) -> dict:
    peaks, by_phase = memory.gather()
    return {"peak_memory_bytes": int(max(peaks)), "peak_memory_bytes_per_worker": peaks,
            "peak_memory_bytes_by_phase": by_phase,
            "memory_at_start_bytes_per_worker": dist.all_gather_objects(memory.start_bytes)}


def params_result(params: tuple[int, int]) -> dict:
    return {"trainable_params": params[0], "total_params": params[1]}


def resumed_from(ctx: WorkerContext) -> str | None:
    return ctx.resumed_from or (str(ctx.resume_dir) if ctx.resume_dir else None)


def summary_for_wandb(eval_end: dict | None, plan: dict | None, result: dict) -> dict:
    """Eval numbers, and the planner's prediction next to what was measured, so every run checks the planner."""
    out = {k: v for k, v in (eval_end or {}).items() if isinstance(v, (int, float))}
    if plan:
        by_phase = result["peak_memory_bytes_by_phase"]
        out.update({"plan/predicted_peak_bytes": plan.get("peak_bytes"),
                    "plan/measured_peak_bytes": result["peak_memory_bytes"], "plan/fits": plan.get("fits"),
                    **{f"plan/{phase}/predicted_peak_bytes": max(p.values())
                       for phase, p in plan.get("phases", {}).items()},
                    **{f"plan/{phase}/measured_peak_bytes": max(v) for phase, v in (by_phase or {}).items()}})
    return out


def write_result(ctx: WorkerContext, hooks: RunHooks, result: dict, *uploads: str) -> dict:
    """Rank 0 writes train_result.json and uploads it with the other files named."""
    if ctx.rank == 0:
        write_json(ctx.run_dir / "train_result.json", result)
        hooks.upload(*uploads)
    return result


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
