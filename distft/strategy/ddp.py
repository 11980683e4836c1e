"""DistributedDataParallel: every worker holds the whole model; gradients are averaged."""

import contextlib
import inspect
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from distft.dtypes import torch_dtype
from distft.strategy.base import (
    ModelLoader,
    OptimizerBuilder,
    SchedulerBuilder,
    Sharding,
    trainable_parameters,
)

# torch 2.13 renamed the option (broadcast_buffers is deprecated there); older torches (the Docker image's 2.9) lack
# the new name
CHECKPOINT_FILE = "model.safetensors"  # the trainable weights, written by rank 0
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class DDPStrategy:
    def __init__(self, *, device: torch.device, precision: str = "fp32", find_unused_parameters: bool = False,
                 **_other_strategy_options):
        self.device = device
        self.precision = precision
        self.find_unused_parameters = find_unused_parameters
        self._module: torch.nn.Module | None = None
        self._wrapped: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None

    @staticmethod
    def sharding(options: dict) -> Sharding:
        return Sharding(engine="ddp", shards_parameters=False)

    @staticmethod
    def config_problems(*, method: str, precision: str, use_gpu: bool, options: dict,
                        quant_storage: str | None = None) -> list[str]:
        if options.get("rank0_load"):
            return ["strategy.rank0_load=true: DDP keeps a full replica on every worker, so every worker loads the "
                    "weights; use strategy=fsdp or strategy=zero3 to load on rank 0 only, or remove the option"]
        return []

    def load_model(self, load: ModelLoader, *, rank: int, quantized: bool) -> torch.nn.Module:
        return load()  # a full replica per worker by definition (read through mmap, one copy per process)

    def prepare(self, model, build_optimizer: OptimizerBuilder, build_scheduler: SchedulerBuilder) -> None:
        self._module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            # gradient_as_bucket_view: the gradients are views into the buckets DDP all-reduces, not a second copy
            # (one model's worth of gradient memory less: ~25 GiB for 7B full fine-tuning in fp32).
            # No buffer broadcast before each forward: a Llama's only buffers (rotary frequencies) are computed
            # identically on every rank, so it would be a collective for nothing.
            self._wrapped = DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters,
                gradient_as_bucket_view=True, **_NO_FORWARD_BUFFER_SYNC,
            )
        else:
            self._wrapped = model
        self.optimizer = build_optimizer(self.trainable_parameters())
        self.scheduler = build_scheduler(self.optimizer)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return trainable_parameters(self._module)

    @property
    def model(self) -> torch.nn.Module:
        return self._wrapped

    def unwrap(self) -> torch.nn.Module:
        return self._module

    def local_trainable_tensors(self) -> list[torch.Tensor]:
        return self.trainable_parameters()  # a full replica

    shards_parameters = False

    @contextlib.contextmanager
    def generation_context(self, gather: bool = True):
        yield self._module  # a full replica: no communication needed

    def forward_context(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch_dtype(self.precision))

    def sync_context(self, sync: bool):
        if sync or not isinstance(self._wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self._wrapped.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        params = self.trainable_parameters()
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self._module.named_parameters() if p.requires_grad}

    def save(self, ckpt_dir: Path, rank: int) -> None:
        # Replicas are identical after every step, so rank 0's copy is the checkpoint.
        if rank != 0:
            return
        save_file(self._trainable_state(), str(ckpt_dir / CHECKPOINT_FILE))
        torch.save(self.optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), ckpt_dir / "scheduler.pt")

    def load(self, ckpt_dir: Path, rank: int) -> None:
        state = load_file(str(ckpt_dir / CHECKPOINT_FILE))
        params = dict(self._module.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if missing:
            raise RuntimeError(f"checkpoint {ckpt_dir} lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device))
        self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt"))

    def export(self, out_dir: Path, tokenizer, rank: int) -> None:
        """Rank 0 writes its replica, one tensor at a time (no second copy of the model in host memory)."""
        from distft.export_shards import export_plan, write_export

        if rank != 0:
            return
        plan = export_plan(self._module, precision=self.precision)
        write_export(out_dir, self._module, plan, self.export_tensors(rank, plan), rank=rank, tokenizer=tokenizer)

    def export_tensors(self, rank: int, plan=None):
        """The export's tensors from rank 0's replica (no communication); nothing on the other ranks."""
        from distft.export_shards import export_plan, local_tensors

        if rank != 0:
            return iter(())
        return local_tensors(self._module, plan or export_plan(self._module, precision=self.precision), rank=rank)
