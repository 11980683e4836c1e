"""Small collective helpers that also work in a single process without a process group."""

import os
import resource

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(value: float | int, device: torch.device, op: str = "sum") -> float:
    if not is_distributed():
        return float(value)
    # float64 keeps token counts and loss sums exact enough for bit-stable logging across world sizes
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return float(t.item())


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by this process, or its peak resident host memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA bytes allocated, or the resident set of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
