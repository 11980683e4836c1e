"""The one interface the training loop sees. DDP, FSDP and DeepSpeed differ only behind it."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

OptimizerBuilder = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
# `load()` reads the base model's weights on this rank; `load(empty=True)` builds it on the meta device instead.
ModelLoader = Callable[..., torch.nn.Module]
SchedulerBuilder = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class Sharding:
    """How a strategy lays the model out over the workers. The planner models memory from this (never from the
    strategy's name), and rank-0 loading defaults to on where parameters are sharded."""

    engine: str  # "ddp" | "fsdp" | "deepspeed": whose memory layout the planner's formulas follow
    shards_parameters: bool
    zero_stage: int = 0  # DeepSpeed only
    offload_params: bool = False  # parameters live in host memory between uses
    offload_optimizer: bool = False  # optimizer states (and the step) in host memory
    buffers: dict = field(default_factory=dict)  # DeepSpeed: the zero_optimization bucket sizes a user set


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train, in module order (the optimizer's and every checkpoint's order)."""
    return [p for p in module.parameters() if p.requires_grad]


class Strategy(Protocol):
    @staticmethod
    def sharding(options: dict) -> Sharding:
        """What these `strategy.*` options shard and offload (a class-level fact: no model needed)."""

    @staticmethod
    def config_problems(*, method: str, precision: str, use_gpu: bool, options: dict,
                        quant_storage: str | None = None) -> list[str]:
        """Settings this strategy cannot run, each naming the key, the reason and a working alternative."""

    def load_model(self, load: ModelLoader, *, rank: int, quantized: bool) -> torch.nn.Module:
        """Build this rank's copy of the base model before `prepare`. Replicating strategies call `load()` on every
        rank; sharding strategies may read the weights on rank 0 only and hand them out in `prepare`."""

    def prepare(self, model: torch.nn.Module, build_optimizer: OptimizerBuilder, build_scheduler: SchedulerBuilder) -> None:
        """Wrap or shard `model` and build its optimizer and LR scheduler."""

    def forward_context(self) -> AbstractContextManager:
        """Mixed-precision context for forward passes (autocast, or nothing when the engine casts itself)."""

    def sync_context(self, sync: bool) -> AbstractContextManager:
        """Gradient accumulation: `sync=False` for every micro-batch but the last of an optimizer step."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float) -> float:
        """Clip, step optimizer and scheduler, zero gradients. Returns the gradient norm before clipping."""

    def current_lr(self) -> float: ...

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped model to call for training forwards."""

    def unwrap(self) -> torch.nn.Module:
        """The Hugging Face / peft module inside any wrapper (its parameters may be sharded)."""

    def local_trainable_tensors(self) -> list[torch.Tensor]:
        """This rank's part of every trainable parameter, in module order: the whole tensor where replicated, the
        local shard where sharded."""

    @property
    def shards_parameters(self) -> bool:
        """Whether each rank holds only a shard of the weights (a forward is then collective)."""

    def generation_context(self, gather: bool = True) -> AbstractContextManager[torch.nn.Module]:
        """Yield a model to call `generate` on. gather=True: each rank can generate independently (gathered weights
        where sharded). gather=False: a sharded model stays sharded and its forwards gather one layer at a time, so
        every rank must make the same `generate` calls with `synced_gpus=True`. Every rank enters and leaves it
        together."""

    def save(self, ckpt_dir: Path, rank: int) -> None:
        """Write this rank's part of the model, optimizer and scheduler state."""

    def load(self, ckpt_dir: Path, rank: int) -> None: ...

    def export_tensors(self, rank: int, plan=None) -> Iterator[tuple[str, torch.Tensor]]:
        """The export's tensors one at a time, gathered from the shards as they are needed (collective; rank 0
        receives them, see distft.export_shards)."""

    def export(self, out_dir: Path, tokenizer, rank: int) -> None:
        """Write a plain Hugging Face directory (full model or peft adapter) loadable without distft.
        Called on every rank (sharded strategies gather collectively); rank 0 writes."""
