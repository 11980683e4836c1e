"""Training-state checkpoints: model/optimizer/scheduler from the strategy, plus per-rank RNG and data position.

Each rank writes its files into a local directory that it reports to Ray, and Ray merges the ranks' files into one
checkpoint directory. A checkpoint counts as valid only when its metadata file (written last by rank 0) exists and
every rank's files are present with the sizes that rank recorded in its manifest (so a save cut short, a lost file
or a truncated one is detected without loading anything). Checks go through a pyarrow filesystem, so they work on
local, NFS and cloud storage alike. A checkpoint resumes on another number of workers where the strategy reshards
its state (FSDP, DDP; not DeepSpeed ZeRO) and the data position carries over exactly (see `load_checkpoint`).
"""

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distft.errors import UserError
from distft.storage import RunStorage, checkpoint_sort_key, resolve_filesystem

log = logging.getLogger("distft")

META = "distft_checkpoint.json"
FORMAT_VERSION = 2  # 2: per-rank manifests with file sizes


def _rank_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


def _manifest_file(rank: int) -> str:
    return f"rank{rank}_files.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_dir: Path, *, strategy, rank: int, world_size: int, step: int, loader_state: dict, info: dict) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    strategy.save(ckpt_dir, rank)
    torch.save({"rng": rng_state(), "loader": loader_state}, ckpt_dir / _rank_file(rank))
    # Each rank reports only its own files (Ray merges the directories), so each lists exactly what it wrote.
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
             if p.is_file() and not p.name.startswith(META)}
    (ckpt_dir / _manifest_file(rank)).write_text(json.dumps(files, indent=1))
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, **info}
        tmp = ckpt_dir / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, ckpt_dir / META)


def check_checkpoint(ckpt_dir, filesystem=None) -> str | None:
    """Return why `ckpt_dir` is not a complete checkpoint, or None if it is.

    Args:
        ckpt_dir: the checkpoint directory (a local path, or a path inside `filesystem`).
        filesystem: a pyarrow filesystem; None for the local one.
    """
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    root = str(ckpt_dir).rstrip("/")
    meta_path = f"{root}/{META}"
    try:
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode())
    except FileNotFoundError:
        return f"{meta_path} is missing (the save was interrupted)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{meta_path} is corrupt: {e}"
    sizes = {i.path[len(root) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    missing = [_rank_file(r) for r in range(meta["world_size"]) if _rank_file(r) not in sizes]
    if missing:
        return f"{root} lacks {missing}"
    if meta.get("format", 1) < 2:
        return None
    for r in range(meta["world_size"]):
        if _manifest_file(r) not in sizes:
            return f"{root} lacks {_manifest_file(r)}"
        with fs.open_input_stream(f"{root}/{_manifest_file(r)}") as f:
            expected = json.loads(f.read().decode())
        for name, size in expected.items():
            if name not in sizes:
                return f"{root} lacks {name} (written by rank {r})"
            if sizes[name] != size:
                return f"{root}/{name} has {sizes[name]} bytes, rank {r} wrote {size} (truncated or overwritten)"
    return None


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / META).read_text())


# Engines whose checkpoints load on any number of workers, and why.
RESHARDS_ON_LOAD = {
    "fsdp": "torch.distributed.checkpoint reshards the model and optimizer shards to the new workers as it reads them",
    "ddp": "the model and optimizer state are one replica's, which every worker reads",
}


def load_checkpoint(ckpt_dir: Path, *, strategy, rank: int, world_size: int, batches=None,
                    global_batch_size: int | None = None) -> dict:
    """Restore the strategy's state, this rank's RNG and, given `batches` (a `ShardedBatches`), its data position.
    Returns the metadata and the loader state this rank resumed from.

    A checkpoint of another number of workers loads where the strategy reshards (`RESHARDS_ON_LOAD`) and the data
    position carries over exactly (`ShardedBatches.convert_position`, which needs this run's `global_batch_size`);
    the step and the LR schedule are global. New rank r takes the RNG state of old rank r % old_world, so new ranks
    beyond the old world repeat an old rank's stream: the RNG only drives dropout (the data order comes from seeded
    permutations), so a dropout-free run (full fine-tuning, LoRA with method.lora_dropout=0) does not depend on it.
    """
    problem = check_checkpoint(ckpt_dir)
    if problem:
        raise RuntimeError(f"cannot resume: {problem}")
    meta = read_meta(ckpt_dir)
    saved_world = meta["world_size"]
    if saved_world != world_size:
        _check_resharding(ckpt_dir, strategy, saved_world=saved_world, world_size=world_size)
    state = torch.load(ckpt_dir / _rank_file(rank % saved_world), weights_only=False)
    if batches is not None:  # before the strategy's (long) load: a refusal comes at once
        if saved_world != world_size and "world_size" not in state["loader"]:
            raise UserError(f"checkpoint {ckpt_dir} was written by a distft whose data position does not record "
                            f"its world size, so it resumes only on the same workers: resume with "
                            f"scaling.num_workers={saved_world}")
        batches.load_state_dict(state["loader"], step=meta["step"], global_batch_size=global_batch_size)
    strategy.load(ckpt_dir, rank)
    set_rng_state(state["rng"])
    if saved_world != world_size and rank == 0:
        log.info("resumed a checkpoint of %d workers on %d workers", saved_world, world_size)
    return {**meta, "loader": state["loader"]}


def _check_resharding(ckpt_dir: Path, strategy, *, saved_world: int, world_size: int) -> None:
    """Refuse to load a checkpoint of `saved_world` workers on `world_size` where the strategy cannot reshard it."""
    fix = f"resume with scaling.num_workers={saved_world}"
    sharding = getattr(strategy, "sharding", None)
    engine = sharding({}).engine if sharding else None
    if engine == "deepspeed":
        raise UserError(
            f"checkpoint {ckpt_dir} was written by {saved_world} workers but this run has {world_size}: DeepSpeed "
            f"ZeRO-{getattr(strategy, 'zero_stage', '?')} saves its partitions of the optimizer state (ZeRO-3: and "
            f"of the weights) per worker and loads them only on as many workers; {fix}. (DeepSpeed's offline "
            "converter `python -m deepspeed.checkpoint.ds_to_universal` turns such a checkpoint into a universal one, "
            "which distft does not load yet.)")
    if engine not in RESHARDS_ON_LOAD:
        raise RuntimeError(f"checkpoint {ckpt_dir} was written by {saved_world} workers but this run has "
                           f"{world_size}, and {type(strategy).__name__} cannot load it on another number of "
                           f"workers; {fix} or start a new run.name")


class Checkpointer:
    """When a run saves and how: each rank writes its part into a temporary directory, and `report(metrics,
    ckpt_dir, step)` hands it to the run's storage (Ray Train's `report` under distft.worker, which copies it and
    commits the checkpoint once every rank has reported)."""

    def __init__(self, strategy, *, rank: int, world: int, every: int, max_steps: int, info: dict,
                 report: Callable[[dict, Path, int], None]):
        self.strategy, self.rank, self.world = strategy, rank, world
        self.every, self.max_steps, self.info, self.report = every, max_steps, info, report

    def should_save(self, step: int, *, now: bool = False) -> bool:
        """Every `trainer.checkpoint_every` steps, at the last step, and when asked (a stop, preflight)."""
        return now or step % self.every == 0 or step == self.max_steps

    def save(self, step: int, *, loader_state: dict, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="distft-ckpt-") as tmp:
            save_checkpoint(Path(tmp), strategy=self.strategy, rank=self.rank, world_size=self.world, step=step,
                            loader_state=loader_state, info=self.info)
            self.report({"step": step, **metrics}, Path(tmp), step)

    def restore(self, ckpt_dir: Path, batches=None, *, global_batch_size: int | None = None) -> dict:
        """Load a checkpoint chosen by `choose_resume` into the strategy and, given them, `batches` (see
        `load_checkpoint`); returns its metadata and loader state."""
        problem = check_checkpoint(ckpt_dir)
        if problem:
            raise RuntimeError(f"this run was handed an incomplete checkpoint: {problem}")
        state = load_checkpoint(ckpt_dir, strategy=self.strategy, rank=self.rank, world_size=self.world,
                                batches=batches, global_batch_size=global_batch_size)
        log.info("resumed from %s at step %d", ckpt_dir, state["step"])
        return state


@dataclass(frozen=True)
class ResumeChoice:
    """Where a run resumes: `path` (None: from scratch), the suffix for the names of the checkpoints this attempt
    writes, a warning for summary.json, or `refusal`, the reason not to start at all."""

    path: str | None = None
    name_suffix: str = ""
    warning: str | None = None
    refusal: str | None = None


def choose_resume(latest: str | None, *, filesystem, storage: RunStorage, explicit: str | None) -> ResumeChoice:
    """The checkpoint to resume from: `latest` (the run's latest committed one, in `filesystem`) when it is
    complete; otherwise the newest complete older `checkpoint_*` of the run, with a warning.

    After a fallback, new checkpoints must not reuse the broken ones' names, or the retention of the old entry
    would later delete the new directory: hence a name suffix. A broken checkpoint the user named explicitly
    (`run.resume_from`) is refused rather than silently replaced.
    """
    if latest is None:
        return ResumeChoice()
    problem = check_checkpoint(latest, filesystem)
    if problem is None:
        return ResumeChoice(path=latest)
    if explicit is not None:
        _, explicit_path = resolve_filesystem(explicit)
        if explicit_path.rstrip("/") == latest.rstrip("/"):
            return ResumeChoice(refusal=f"run.resume_from={explicit} is not a complete checkpoint: {problem}")
    latest_key = checkpoint_sort_key(latest.rstrip("/").rsplit("/", 1)[-1])
    for name in storage.checkpoint_dirs():  # newest first; only ones older than the broken one
        path = f"{storage.fs_path}/{name}"
        if checkpoint_sort_key(name) >= latest_key:
            continue
        if check_checkpoint(path, storage.filesystem) is None:
            warning = f"the latest checkpoint {latest} is incomplete ({problem}); resumed from the newest " \
                      f"complete one, {path}"
            log.warning(warning)
            return ResumeChoice(path=path, name_suffix=f"-r{int(time.time())}", warning=warning)
    return ResumeChoice(refusal=f"the latest checkpoint {latest} is incomplete ({problem}) and no complete "
                                f"checkpoint_* is left in {storage.uri}; start a new run.name, or pass "
                                "run.resume_from=PATH_TO_A_GOOD_CHECKPOINT")


def check_resume_from(path: str | None):
    """(filesystem, path) of the checkpoint named by run.resume_from, checked now: an explicitly requested bad
    checkpoint fails loudly, before anything starts."""
    if path is None:
        return None
    filesystem, fs_path = resolve_filesystem(path)
    problem = check_checkpoint(fs_path, filesystem)
    if problem:
        raise UserError(f"run.resume_from={path} is not a usable checkpoint: {problem}. Point it at a complete "
                        "checkpoint_NNNNNN directory of an earlier run (it holds distft_checkpoint.json)")
    return filesystem, fs_path
