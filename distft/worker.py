"""What Ray Train runs on every worker: read the worker's place in the run from Ray, choose the checkpoint to resume
from, and call the framework-free recipe (`distft.recipe.run_training`) with Ray's report, storage and stop hooks."""

import contextlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distft import dist, preemption
from distft.checkpoint import choose_resume
from distft.console import worker_user_error
from distft.errors import UserError
from distft.recipe import RunHooks, WorkerContext, run_training
from distft.storage import RunStorage, resolve_filesystem


def train_worker(config: dict) -> None:
    """Entry point that Ray Train calls on each worker (`train_loop_config` is `config`)."""
    import ray.train

    cfg = OmegaConf.create(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    storage = RunStorage(cfg.run.storage_path, cfg.run.name)
    try:
        run_worker(cfg, config, storage)
    except UserError as e:  # the driver prints the message; the traceback goes to the run's logs/
        raise worker_user_error(e, rank=rank, run_dir=storage.local_dir) from None


def run_worker(cfg, config: dict, storage: RunStorage) -> None:
    import ray
    import ray.train

    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    handed = ray.train.get_checkpoint() or explicit_checkpoint(cfg.run.resume_from)
    checkpoint, name_suffix, resume_warning = resume_checkpoint(handed, storage=storage,
                                                                explicit=cfg.run.resume_from, rank=rank)
    if rank == 0 and checkpoint is not None:
        storage.pull("metrics.jsonl")  # a new node's staging copy may be missing or stale
    nodes = len(set(dist.all_gather_objects(ray.get_runtime_context().get_node_id())))
    hooks = RunHooks(report=lambda metrics, ckpt_dir, step: report(metrics, ckpt_dir, step, name_suffix),
                     sync=storage.push if rank == 0 else None,
                     should_stop=preemption.stop_requests(cfg.run.name),
                     fetch_checkpoint=lambda step: stored_checkpoint(storage, step, name_suffix))
    preemption.training_started()
    try:
        with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as ckpt_path:
            ctx = WorkerContext(
                run_dir=storage.local_dir, model_dir=config["model_dir"], rank=rank, world=world,
                device=ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu"),
                resume_dir=Path(ckpt_path) if ckpt_path else None,
                resumed_from=checkpoint_location(checkpoint, storage, explicit=cfg.run.resume_from),
                resume_warning=resume_warning,
                worker_nodes=nodes, plan=config.get("plan"),
                train_rows=ray.get(config["train_rows"]) if config.get("train_rows") is not None else None)
            run_training(cfg, ctx, hooks)
    finally:
        preemption.training_finished()


def explicit_checkpoint(path: str | None):
    """run.resume_from as a Ray checkpoint, for a run that has none of its own yet (Ray hands a restarted run its
    latest checkpoint, which then wins)."""
    if path is None:
        return None
    import ray.train

    filesystem, fs_path = resolve_filesystem(path)
    return ray.train.Checkpoint(fs_path, filesystem=filesystem)


def resume_checkpoint(handed, *, storage: RunStorage, explicit: str | None, rank: int):
    """The checkpoint to resume from (see `distft.checkpoint.choose_resume`), given the one Ray hands over (its
    latest committed one). Rank 0 decides and the others follow, so every rank loads the same one.

    Returns (ray.train.Checkpoint or None, suffix for the names of the checkpoints this attempt writes, warning).
    """
    import ray.train

    choice = None
    if rank == 0:
        choice = choose_resume(handed.path if handed else None, filesystem=handed.filesystem if handed else None,
                               storage=storage, explicit=explicit)
    choice = dist.all_gather_objects(choice)[0]
    if choice.refusal:  # rank 0's reason for refusing to start
        raise UserError(choice.refusal)
    if choice.path is None:
        return None, "", None
    if choice.path == handed.path:
        return handed, choice.name_suffix, choice.warning
    return ray.train.Checkpoint(choice.path, filesystem=storage.filesystem), choice.name_suffix, choice.warning


def checkpoint_location(checkpoint, storage: RunStorage, explicit: str | None = None) -> str | None:
    """Where a checkpoint lives as users see it (the URI for cloud storage; run.resume_from as it was given)."""
    if checkpoint is None:
        return None
    if explicit is not None and checkpoint.path.rstrip("/") == resolve_filesystem(explicit)[1].rstrip("/"):
        return explicit
    if storage.remote and checkpoint.path.startswith(storage.fs_path):
        return storage.uri + checkpoint.path[len(storage.fs_path):]
    return checkpoint.path


def stored_checkpoint(storage: RunStorage, step: int, name_suffix: str):
    """The checkpoint of `step` as Ray persisted it, at its storage location (a local path, or a URI that is
    downloaded while the context is open) — what a restarted run would load."""
    import ray.train

    name = f"checkpoint_{step:06d}{name_suffix}"
    return ray.train.Checkpoint(f"{storage.fs_path}/{name}", filesystem=storage.filesystem), storage.location(name)


def report(metrics: dict, ckpt_dir: Path, step: int, name_suffix: str = "") -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                     checkpoint_dir_name=f"checkpoint_{step:06d}{name_suffix}")
