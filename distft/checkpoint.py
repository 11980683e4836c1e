"""Training-state checkpoints: model/optimizer/scheduler from the strategy, plus per-rank RNG and data position.

Each rank writes its files into a local directory that it reports to Ray, and Ray merges the ranks' files into one
checkpoint directory. A checkpoint counts as valid only when its metadata file (written last by rank 0) exists and
every rank's state file is present.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

META = "distft_checkpoint.json"
FORMAT_VERSION = 1


def _rank_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


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
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, **info}
        tmp = ckpt_dir / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, ckpt_dir / META)


def check_checkpoint(ckpt_dir: Path) -> str | None:
    """Return why `ckpt_dir` is not a complete checkpoint, or None if it is."""
    meta_path = ckpt_dir / META
    if not meta_path.exists():
        return f"{meta_path} is missing (the save was interrupted)"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        return f"{meta_path} is corrupt: {e}"
    missing = [_rank_file(r) for r in range(meta["world_size"]) if not (ckpt_dir / _rank_file(r)).exists()]
    if missing:
        return f"{ckpt_dir} lacks {missing}"
    return None


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / META).read_text())


def load_checkpoint(ckpt_dir: Path, *, strategy, rank: int, world_size: int) -> dict:
    """Restore the strategy's state and this rank's RNG. Returns the metadata and this rank's loader state."""
    problem = check_checkpoint(ckpt_dir)
    if problem:
        raise RuntimeError(f"cannot resume: {problem}")
    meta = read_meta(ckpt_dir)
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} was written by {meta['world_size']} workers but this run has {world_size}; "
            f"resume with scaling.num_workers={meta['world_size']} or start a new run.name"
        )
    strategy.load(ckpt_dir, rank)
    state = torch.load(ckpt_dir / _rank_file(rank), weights_only=False)
    set_rng_state(state["rng"])
    return {**meta, "loader": state["loader"]}
