"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer states sharded over the workers.

Each decoder layer is one FSDP unit (its weights are all-gathered just before its forward and backward and freed
afterwards), the root module holds the rest (embeddings, final norm, LM head; tied weights stay tied because both
uses live in the root unit). Gradients are reduce-scattered and averaged over workers, so the loss the recipe passes
to `backward` is scaled exactly as for DDP.

Loading (`rank0_load`, on by default except for QLoRA) streams the checkpoint: every rank, rank 0 too, builds the
model without weights and the method is applied to it; after `fully_shard` each rank allocates only its shards, and
rank 0 reads the safetensors files lazily, one decoder layer at a time, broadcasting each group into everyone's
shards before reading the next (distft.strategy.streaming). No rank ever holds the whole model: host memory at load is
about one layer on rank 0 plus each rank's shards, and the numbers are the same as when every rank loads (tested).
A checkpoint that cannot be streamed as it is (no safetensors, only `pytorch_model.bin`; keys that transformers
renames or fuses while loading) falls back, with a warning that says why, to the older rank-0 load: rank 0 reads the
whole model into host memory with `from_pretrained`, the others start from meta tensors, and after sharding
`set_model_state_dict(..., broadcast_from_rank0=True)` sends each tensor from rank 0's copy. With `rank0_load=false`
(and QLoRA, whose 4-bit weights bitsandbytes quantises while loading) every rank loads the whole model.

Checkpoints use torch.distributed.checkpoint (DCP): every rank writes only its own shards (`__<rank>_0.distcp`) and
rank 0 the `.metadata` index, so the ranks' directories merge into one checkpoint without name collisions.
"""

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from distft import settings
from distft.dtypes import dtype_name
from distft.model import disable_bnb_cpu_repack
from distft.strategy.base import (
    ModelLoader,
    OptimizerBuilder,
    SchedulerBuilder,
    Sharding,
    trainable_parameters,
)
from distft.strategy.streaming import StreamingLoad, decoder_layers, open_checkpoint

log = logging.getLogger(__name__)

DCP_SUBDIR = "fsdp_dcp"  # model + optimizer shards (one file per rank) and DCP's .metadata
SCHEDULER_FILE = "scheduler.pt"
# strategy.* keys that belong to other strategies, with the value that means "not used"
_FOREIGN_OPTIONS = {"zero_stage": 0, "offload_optimizer": False, "offload_params": False, "deepspeed": {},
                    "find_unused_parameters": False}


class FSDPStrategy:
    def __init__(self, *, device: torch.device, precision: str = "fp32", reshard_after_forward: bool = True,
                 cpu_offload: bool = False, rank0_load: bool | None = None, **_other_strategy_options):
        self.device = device
        self.rank0_load = rank0_load  # None: on unless the model is 4-bit
        # set by load_model: how prepare fills the weights in after sharding (streamed, or from rank 0's full copy)
        self._streaming: StreamingLoad | None = None
        self._broadcast_from_rank0 = False
        self.precision = precision
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self._module: torch.nn.Module | None = None
        self._layers: list[torch.nn.Module] = []
        self.sync_every_micro_batch = True  # set by prepare (see sync_context)
        self.optimizer = None
        self.scheduler = None

    # --- set-up -------------------------------------------------------------------------------------------

    @staticmethod
    def sharding(options: dict) -> Sharding:
        offload = bool(options.get("cpu_offload", False))  # parameters, gradients and the optimizer step
        return Sharding(engine="fsdp", shards_parameters=True, offload_params=offload, offload_optimizer=offload)

    @staticmethod
    def config_problems(*, method: str, precision: str, use_gpu: bool, options: dict,
                        quant_storage: str | None = None) -> list[str]:
        """Settings that cannot do what they say under FSDP, each with a working alternative."""
        problems = []
        name = options.get("name", "fsdp")
        for key, unused in _FOREIGN_OPTIONS.items():
            value = options.get(key, unused)
            if value != unused:
                hint = ("use strategy=fsdp_offload (or strategy.cpu_offload=true)" if key.startswith("offload")
                        else "use strategy=zero1/zero2/zero3 for DeepSpeed" if key in ("zero_stage", "deepspeed")
                        else "remove it")
                problems.append(f"strategy.{key}={value} has no effect with strategy={name} "
                                f"(it is an option of another strategy); {hint}")
        why = FSDPStrategy.rank0_load_problem(method)
        if options.get("rank0_load") and why:
            problems.append(f"strategy.rank0_load=true with method={method}: {why}; remove strategy.rank0_load (every "
                            "rank then loads and quantises the 4-bit base, which is small) or use method=lora")
        if method == "qlora" and precision == "bf16":
            problem = quant_storage_problem(quant_storage, "bf16")
            if problem:
                problems.append(f"{problem} (with strategy={name})")
        return problems

    def load_model(self, load: ModelLoader, *, rank: int, quantized: bool) -> torch.nn.Module:
        """Every rank builds the model without weights, which `prepare` streams in from rank 0's reads after sharding
        (see the module docstring); a checkpoint that cannot be streamed is read whole by rank 0 instead."""
        self._streaming, self._broadcast_from_rank0 = None, False
        if not settings.rank0_load(self.rank0_load, shards_parameters=True, quantized=quantized):
            if quantized and self.rank0_load is None:
                log.info("FSDP: every rank loads the 4-bit base (%s)", self.rank0_load_problem("qlora"))
            return load()
        model = load(empty=True)
        checkpoint, problem = open_checkpoint(model, rank)  # rank 0 decides; collective
        if problem is None:
            if rank == 0:
                log.info("FSDP: every rank builds the model without weights; rank 0 streams them from %d safetensors "
                         "file(s), one decoder layer at a time, after sharding", len(checkpoint.files))
            self._streaming = StreamingLoad(model, checkpoint)  # parameters become CPU stand-ins (no memory)
            return model
        if rank == 0:
            log.warning("FSDP: the weights cannot be streamed layer by layer because %s; rank 0 reads the whole model "
                        "into host memory instead and broadcasts it after sharding", problem)
        # Rank 0 keeps its full copy in host memory (a 70B model fits no accelerator); `fully_shard` moves only
        # each rank's shards to the device, and the broadcast sends one tensor at a time.
        self._broadcast_from_rank0 = True
        return model if rank != 0 else load(device=torch.device("cpu"))

    @staticmethod
    def rank0_load_problem(method: str) -> str | None:
        """Why rank-0 loading cannot run with this method, or None."""
        if method == "qlora":
            return ("bitsandbytes quantises the weights while each rank loads them, and its packed 4-bit tensors "
                    "and their quantisation state cannot be broadcast from rank 0 into meta tensors")
        return None

    def prepare(self, model: torch.nn.Module, build_optimizer: OptimizerBuilder,
                build_scheduler: SchedulerBuilder) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("strategy=fsdp needs an initialised torch.distributed process group "
                               "(Ray Train sets one up on every worker)")
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        kwargs = {"mesh": mesh, "offload_policy": OffloadPolicy()}
        if self.cpu_offload:
            # Pinned host memory speeds up host<->GPU copies; a CPU-only build has no pinned memory.
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        param_dtype = None
        if self.precision == "bf16":
            # Weights are gathered and used in bf16; gradients are reduced and the optimizer steps in fp32.
            param_dtype = torch.bfloat16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        elif self.precision != "fp32":
            raise ValueError(f"strategy=fsdp supports trainer.precision fp32 or bf16, not {self.precision}")
        _prepare_4bit_layers(model, param_dtype)
        # Rank 0's full weights, kept until they are broadcast into everyone's shards (other ranks: meta tensors).
        full_state = (model.state_dict() if dist.get_rank() == 0 else {}) if self._broadcast_from_rank0 else None
        self._layers = decoder_layers(model)
        if not self._layers:
            raise RuntimeError(f"strategy=fsdp found no '*DecoderLayer' modules in {type(model).__name__} to shard")
        if self._streaming is not None:  # everything to meta: fully_shard then shards nothing but shapes
            self._streaming.detach(model, self._layers)
        for layer in self._layers:
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **kwargs)
        # The root (embeddings, norm, LM head) is needed again as soon as backward starts: keep it gathered.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        if full_state is not None:
            self._fill_from_rank0(model, full_state)
            del full_state
        elif self._streaming is not None:
            self._allocate_shards(model)
            self._streaming.fill(model, rank=dist.get_rank(), buffer_device=self.device)
            self._streaming = None
        self._module = model
        self.sync_every_micro_batch = all(p.requires_grad for p in model.parameters())
        self.optimizer = build_optimizer(self.trainable_parameters())  # DTensor shards
        self.scheduler = build_scheduler(self.optimizer)
        log.info("FSDP2: %d decoder layers + root sharded over %d ranks (reshard_after_forward=%s, cpu_offload=%s, "
                 "gradient sync every micro-batch=%s)", len(self._layers), dist.get_world_size(),
                 self.reshard_after_forward, self.cpu_offload, self.sync_every_micro_batch)

    def _allocate_shards(self, model: torch.nn.Module) -> None:
        """Uninitialised memory for the meta tensors: only the local shards, since fully_shard already replaced each
        parameter by its DTensor shard (buffers whole)."""
        model.to_empty(device="cpu" if self.cpu_offload else self.device)

    def _fill_from_rank0(self, model: torch.nn.Module, full_state: dict) -> None:
        """Allocate meta ranks' shards, then send every tensor from rank 0 (collective: all ranks call this)."""
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            self._allocate_shards(model)
            if self.cpu_offload:
                for module in model.modules():  # buffers stay on the compute device under CPU offload
                    for name, buf in module._buffers.items():
                        if buf is not None:
                            module._buffers[name] = buf.to(self.device)
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Non-persistent buffers (the rotary embedding's inv_freq) are in no state dict: rank 0 computed them.
        for buf in model.buffers():
            dist.broadcast(buf, src=0)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return trainable_parameters(self._module)

    @property
    def model(self) -> torch.nn.Module:
        return self._module

    def unwrap(self) -> torch.nn.Module:
        return self._module  # fully_shard wraps in place: the module is the HF / peft model, parameters sharded

    def local_trainable_tensors(self) -> list[torch.Tensor]:
        return [p.to_local() if isinstance(p, DTensor) else p for p in self.trainable_parameters()]

    # --- training -----------------------------------------------------------------------------------------

    def forward_context(self):
        # With bf16 the MixedPrecisionPolicy casts the gathered weights; no autocast either way.
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sync_context(self, sync: bool):
        # Without sync, FSDP2 keeps an unsharded fp32 gradient per parameter until the last micro-batch
        # (_fsdp_param.py to_accumulated_grad_if_needed): the whole model's gradients on every rank, +52 GB at 13B
        # full fine-tuning. So a fully trainable model reduce-scatters every micro-batch and accumulates into its
        # sharded gradients (what the planner counts); LoRA/QLoRA's few trainable weights skip the communication.
        self._module.set_requires_gradient_sync(sync or self.sync_every_micro_batch)
        try:
            yield
        finally:
            self._module.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # --- generation ---------------------------------------------------------------------------------------

    def _fsdp_modules(self) -> list[FSDPModule]:
        return [m for m in self._module.modules() if isinstance(m, FSDPModule)]

    shards_parameters = True

    @contextlib.contextmanager
    def generation_context(self, gather: bool = True):
        """Gather every layer's full weights once, so each rank can run `generate` alone for any number of steps.
        With gather=False the model is handed out as it is: every forward gathers one layer at a time (at most
        one layer's full weights per rank) and the ranks must decode in step (`synced_gpus`).

        A sharded forward is collective: ranks whose prompts stop at different lengths would wait on each other
        forever. Here all FSDP units are unsharded on entry (one all-gather per unit, on every rank together) and
        kept unsharded during the forwards, which then communicate nothing. Cost: a full replica of the weights
        on every rank for the duration (plus the KV cache), as with DDP.
        """
        if not gather:
            yield self._module
            return
        modules = self._fsdp_modules()
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        # transformers' `generate` sees fully_shard's marker and then all-reduces a "finished" flag after every
        # token (`synced_gpus`), which would again tie the ranks together; the weights are local now.
        marked = [m for m in self._module.modules() if getattr(m, "_is_fsdp_managed_module", False)]
        for m in marked:
            m._is_fsdp_managed_module = False
        try:
            yield self._module
        finally:
            for m in marked:
                m._is_fsdp_managed_module = True
            for m in modules:
                m.set_reshard_after_forward(self.reshard_after_forward and m is not self._module, recurse=False)
                m.reshard()

    # --- checkpoints --------------------------------------------------------------------------------------

    def _state_options(self, **kwargs) -> StateDictOptions:
        # LoRA/QLoRA: only the adapters (and their optimizer state) change, so only they are checkpointed.
        return StateDictOptions(ignore_frozen_params=True, **kwargs)

    def _tensor_names(self) -> set[str]:
        module = self._module
        return ({n for n, _ in module.named_parameters(remove_duplicate=False)}
                | {n for n, _ in module.named_buffers(remove_duplicate=False)})

    def _sharded_state(self) -> dict:
        model_state, optim_state = get_state_dict(self._module, self.optimizer, options=self._state_options())
        # bitsandbytes adds its quantisation constants (absmax, quant_map, ...) to the state dict of a 4-bit
        # layer; they belong to the frozen base, which is re-created from the base model on resume.
        names = self._tensor_names()
        return {"model": {k: v for k, v in model_state.items() if k in names}, "optim": optim_state}

    def save(self, ckpt_dir: Path, rank: int) -> None:
        # Collective: every rank writes its own shards into ckpt_dir; rank 0 also writes DCP's .metadata.
        dcp_save(self._sharded_state(), storage_writer=FileSystemWriter(ckpt_dir / DCP_SUBDIR))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), ckpt_dir / SCHEDULER_FILE)

    def load(self, ckpt_dir: Path, rank: int) -> None:
        state = self._sharded_state()  # the sharded layout to read into
        dcp_load(state, storage_reader=FileSystemReader(ckpt_dir / DCP_SUBDIR))
        set_state_dict(self._module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._state_options(strict=False))
        self.scheduler.load_state_dict(torch.load(ckpt_dir / SCHEDULER_FILE))

    # --- export -------------------------------------------------------------------------------------------

    def export(self, out_dir: Path, tokenizer, rank: int) -> None:
        """Write a plain HF model or peft adapter on rank 0, gathering one parameter at a time (collective): no rank
        ever holds more than one unsharded tensor beyond its shards."""
        from distft.export_shards import export_plan, write_export

        self._reshard_all()
        plan = export_plan(self._module, precision=self.precision)
        write_export(out_dir, self._module, plan, self.export_tensors(rank, plan), rank=rank, tokenizer=tokenizer)

    def export_tensors(self, rank: int, plan=None):
        """The export's tensors in plan order, each all-gathered from its shards on every rank (collective: all ranks
        iterate to the end); rank 0 gets a CPU copy in the export dtype, the others None."""
        from distft.export_shards import export_plan, state_tensors

        self._reshard_all()
        plan = plan or export_plan(self._module, precision=self.precision)
        named = {name: tensor for name, tensor, _ in state_tensors(self._module)}
        return _gather_one_at_a_time(plan, named, rank)

    def _reshard_all(self) -> None:
        """Every unit back to its shards: the root stays unsharded after a forward (reshard_after_forward=False), and
        its parameters are then plain full tensors rather than the DTensors to gather."""
        for module in self._fsdp_modules():
            module.reshard()


def _prepare_4bit_layers(model: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """QLoRA: keep bitsandbytes' 4-bit layers correct under sharding, or say why they cannot be: no in-place CPU
    repacking (see `disable_bnb_cpu_repack`), and no 4-bit weight stored in a float dtype that mixed precision
    would cast."""
    disable_bnb_cpu_repack(model)
    if param_dtype is None:
        return
    for name, p in model.named_parameters():
        if type(p).__name__ != "Params4bit":
            continue
        if p.dtype.is_floating_point:
            problem = quant_storage_problem(dtype_name(p.dtype), dtype_name(param_dtype))
            if problem:
                raise ValueError(f"{name}: {problem}")
        elif not fsdp_keeps_integer_params():
            raise ValueError(f"{name}: 4-bit weights stored as {dtype_name(p.dtype)} under FSDP mixed precision need "
                             f"torch >= {'.'.join(map(str, INTEGER_SAFE_TORCH))} (this worker has {torch.__version__}, whose FSDP2 casts "
                             f"them to {dtype_name(param_dtype)}); set method.quant_storage={dtype_name(param_dtype)}, "
                             "or upgrade torch on the workers")


# FSDP2 leaves integer (uint8-packed 4-bit) parameters uncast under a MixedPrecisionPolicy from this torch on; 2.9.1
# (the Docker base image's until it moved to 2.13) casts them and bitsandbytes then dequantises garbage
# (GPU_REVIEW #3).
INTEGER_SAFE_TORCH = (2, 13)


def fsdp_keeps_integer_params(version: str | None = None) -> bool:
    from torch.torch_version import TorchVersion

    return TorchVersion(version or torch.__version__) >= INTEGER_SAFE_TORCH


def quant_storage_problem(quant_storage: str | None, param_dtype: str) -> str | None:
    """Why 4-bit weights stored as `quant_storage` (method.quant_storage; None: uint8) break under FSDP mixed
    precision with `param_dtype`, or None. FSDP casts every floating-point parameter to `param_dtype` before
    gathering, which would convert a float-stored weight's packed bytes (and the forward fails); integer storage
    is never cast."""
    if quant_storage in (None, param_dtype):
        return None
    return (f"method.quant_storage={quant_storage} with trainer.precision={param_dtype}: FSDP's mixed precision would "
            f"cast the packed 4-bit weights and corrupt them; set method.quant_storage={param_dtype}, leave "
            "method.quant_storage unset (uint8), or use trainer.precision=fp32")


def _gather_one_at_a_time(plan, named: dict[str, torch.Tensor], rank: int):
    """(planned tensor, its full value on rank 0's CPU or None) for each tensor of `plan`, gathered one by one."""
    from distft.export_shards import to_export

    for item in plan.tensors:
        full = _full_tensor(named[item.sources[0]])
        yield item, (to_export(full, item) if rank == 0 else None)
        del full


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's unsharded value (collective for a DTensor); as torch's own full-state-dict gather does, CPU-
    offloaded shards are moved to the mesh's device first."""
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor()
