"""Small collective helpers that also work in a single process without a process group."""

import os
import resource
from contextlib import contextmanager

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


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (unchanged in one process); returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak from the memory in use now. False where the platform cannot (then peaks stay cumulative)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the process's peak resident set (VmHWM, and with it ru_maxrss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """This worker's peak memory in each phase of a run (load, eval, train, save, export, ...), for the planner's
    per-phase predictions: at each phase change the peak is read, attributed to the phase that ends, and reset."""

    def __init__(self, device: torch.device, phase: str = "load"):
        self.start_bytes = current_memory_bytes(device)  # the runtime before any model: the planner's CPU baseline
        self.device, self.phase = device, phase
        self.peaks: dict[str, int] = {}
        self.resettable = reset_peak_memory(device)

    def switch(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak_memory_bytes(self.device))
        self.resettable = reset_peak_memory(self.device) and self.resettable
        self.phase = phase

    @contextmanager
    def during(self, phase: str):
        previous = self.phase
        self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)

    def finish(self) -> tuple[int, dict[str, int] | None]:
        """(peak of the whole run, peak of each phase); phases are None where peaks could not be reset."""
        self.switch(self.phase)
        return max(self.peaks.values()), dict(self.peaks) if self.resettable else None

    def gather(self) -> tuple[list[int], dict[str, list[int]] | None]:
        """Every worker's peak of the whole run, and per phase {phase: [per worker]} (None where not measurable).
        Collective: every rank calls it."""
        gathered = all_gather_objects(self.finish())
        peaks = [peak for peak, _ in gathered]
        if any(phases is None for _, phases in gathered):
            return peaks, None
        return peaks, {phase: [phases.get(phase, 0) for _, phases in gathered] for phase in gathered[0][1]}
