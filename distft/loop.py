"""The optimisation loop: micro-batches → loss → backward → optimizer step, logging, stop requests and checkpoints.

Framework-free (no Ray): it sees the strategy through `distft.strategy.Strategy`, writes through a `RunTracker` and
saves through a `Checkpointer`, so a test can run it in one process.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distft import dist
from distft.checkpoint import Checkpointer
from distft.data import ShardedBatches
from distft.faults import Faults
from distft.loss import causal_lm_loss_sum, model_inputs
from distft.stop import NO_STOP, StopCheck
from distft.tracking import RunTracker

log = logging.getLogger("distft")


@dataclass
class LoopResult:
    step: int
    loss: float | None = None  # the last step's loss
    stopped: str | None = None  # why the run stopped early after a checkpoint (SIGTERM, preemption)
    step_tokens: list[int] = field(default_factory=list)  # this attempt's steps, all workers together
    step_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float | None:
        return steady_throughput(self.step_tokens, self.step_seconds)


def steady_throughput(tokens: list[int], seconds: list[float]) -> float | None:
    """Tokens per second over this attempt's steps, leaving out the first (it pays for warm-up)."""
    if len(seconds) > 1:
        tokens, seconds = tokens[1:], seconds[1:]
    return sum(tokens) / sum(seconds) if seconds else None


def train(strategy, batches: ShardedBatches, *, step: int, max_steps: int, grad_accum: int, max_grad_norm: float,
          world: int, device: torch.device, tracker: RunTracker, checkpointer: Checkpointer, faults: Faults,
          memory: dist.PhasePeaks, stop: StopCheck = NO_STOP,
          after_save: Callable[[], None] = lambda: None, preflight: bool = False,
          loss_chunk_tokens: int | None = None) -> LoopResult:
    """Train from `step` to `max_steps` (preflight: one step), checkpointing on the checkpointer's schedule."""
    stream = batches.forever()
    strategy.model.train()
    memory.switch("train")
    result = LoopResult(step=step)
    tracker.start(max_steps, step)
    while result.step < max_steps:
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(grad_accum)]
        loss, answer_tokens, result.stopped = forward_backward(strategy, micro, step=result.step + 1, world=world,
                                                               device=device, faults=faults, stop=stop,
                                                               loss_chunk_tokens=loss_chunk_tokens)
        lr = strategy.current_lr()
        grad_norm = strategy.step(max_grad_norm)
        result.step += 1
        elapsed = time.perf_counter() - t0
        tokens = sum(b["global_num_tokens"] for b in micro)
        result.step_seconds.append(elapsed)
        result.step_tokens.append(tokens)
        result.loss = loss
        tracker.log_step({"step": result.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_second": tokens / elapsed, "answer_tokens": int(answer_tokens),
                          "epoch": batches.state_dict()["epoch"], "step_seconds": elapsed},
                         last=result.step == max_steps)
        if checkpointer.should_save(result.step, now=bool(result.stopped) or preflight):
            with memory.during("save"):
                checkpointer.save(result.step, loader_state=batches.state_dict(), metrics={"loss": loss})
            after_save()
        if result.stopped:
            log.warning("%s: checkpoint of step %d saved; stopping (rerun the same command to resume)",
                        result.stopped, result.step)
        if result.stopped or preflight:
            break
    tracker.stop()
    return result


def forward_backward(strategy, micro: list[dict], *, step: int, world: int, device: torch.device,
                     faults: Faults, stop: StopCheck = NO_STOP,
                     loss_chunk_tokens: int | None = None) -> tuple[float, int, str | None]:
    """Forward and backward over one optimizer step's micro-batches. Returns (mean loss per answer token over the
    global batch, answer tokens of the global batch, the agreed stop reason or None); raises before the update if
    the loss is not finite.

    One collective and one host read per step: the global batch's token counts come with the batches (every rank
    knows every shard), and this rank's loss sum stays on the device until one all-reduce carries it together with
    this rank's stop flag."""
    global_tokens = sum(b["global_num_loss_tokens"] for b in micro)
    # Each micro-batch's summed token loss is divided by the answer tokens of the whole global batch, so any
    # micro-batch x accumulation x workers factorisation gives the same update. DDP averages over workers,
    # hence the factor `world`.
    scale = world / max(global_tokens, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: summed as exactly as Python floats
    for i, batch in enumerate(micro):
        with strategy.sync_context(sync=i == len(micro) - 1):
            with strategy.forward_context():
                logits = strategy.model(**model_inputs(batch, device)).logits
            token_loss = causal_lm_loss_sum(logits, batch["labels"], chunk_tokens=loss_chunk_tokens)
            strategy.backward(token_loss * scale)
        loss_sum += token_loss.detach().double()
    loss_sum = torch.as_tensor(faults.at_step(step, loss_sum), dtype=torch.float64, device=device)
    totals = dist.all_reduce_tensor(torch.stack([loss_sum, loss_sum.new_tensor(float(stop.local() is not None))]))
    total_loss, stopping = totals.tolist()
    loss = total_loss / max(global_tokens, 1.0)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}; stopped before the optimizer step (no checkpoint of this step "
            "was written). Lower trainer.lr, keep trainer.max_grad_norm set, or check the data for empty answers")
    return loss, global_tokens, stop.agreed(stopping > 0)
