"""Training-state checkpoints: model/optimizer/scheduler from the strategy, plus per-rank RNG and data position.

Each rank writes its files into a local directory that it reports to Ray, and Ray merges the ranks' files into one
checkpoint directory. A checkpoint counts as valid only when its metadata file (written last by rank 0) exists and
every rank's files are present with the sizes that rank recorded in its manifest (so a save cut short, a lost file
or a truncated one is detected without loading anything). Checks go through a pyarrow filesystem, so they work on
local, NFS and cloud storage alike.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

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
