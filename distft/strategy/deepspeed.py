"""DeepSpeed ZeRO stages 1-3 (and ZeRO-3 with CPU offload) behind the `Strategy` interface.

ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also the parameters themselves. The recipe's own
torch AdamW and LambdaLR scheduler are handed to DeepSpeed as client objects, so every strategy optimises with the
same hyper-parameters and schedule (ZeRO-Offload swaps AdamW for DeepSpeedCPUAdam with the same settings).

Three things the recipe relies on that DeepSpeed does differently by default:
- The loss the recipe passes to `backward` is already normalised for the global batch, so DeepSpeed must not divide
  it by `gradient_accumulation_steps` again (`scale_wrt_gas=False`), and its accumulation boundary follows
  `sync_context(sync=True)` rather than DeepSpeed's own micro-step counter.
- Gradient clipping is a `step(max_grad_norm)` argument, not a config key fixed at start-up.
- ZeRO-3 parameters live partitioned across ranks, so export and generation gather them first (see below).

Loading under ZeRO-3 (`rank0_load`, on by default except for QLoRA) is streamed (distft.strategy.streaming): every
rank builds the model without weights, and rank 0 reads the safetensors checkpoint one decoder layer at a time, which
DeepSpeed broadcasts and partitions; no rank holds more than one layer group beyond its partitions. A checkpoint that
cannot be streamed as it is goes through transformers' own DeepSpeed integration instead: while an
`HfDeepSpeedConfig` is alive, `from_pretrained` builds the model inside `deepspeed.zero.Init` and reads the whole
checkpoint on rank 0. ZeRO-1/2 keep whole weights on every rank, so every rank loads.
"""

import contextlib
import copy
import logging
from pathlib import Path

import torch

from distft import settings
from distft.model import disable_bnb_cpu_repack
from distft.strategy.base import (
    ModelLoader,
    OptimizerBuilder,
    SchedulerBuilder,
    Sharding,
    trainable_parameters,
)
from distft.strategy.streaming import decoder_layers, fill_zero3, open_checkpoint

TAG = "ds"  # checkpoint sub-directory; always passed explicitly so DeepSpeed's `latest` file is never needed
# Keys the recipe owns: DeepSpeed's batch arithmetic must match trainer.* and the optimizer/schedule are built
# from trainer.* (a DeepSpeed `optimizer`/`scheduler` section would be ignored or conflict with the client ones).
RECIPE_KEYS = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (trainer.micro_batch_size x scaling.num_workers)",
    "gradient_clipping": "trainer.max_grad_norm",
    "optimizer": "trainer.lr / trainer.betas / trainer.eps / trainer.weight_decay",
    "scheduler": "trainer.lr_schedule / trainer.warmup_steps",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
}
log = logging.getLogger(__name__)
_QLORA_LOAD = ("transformers builds bitsandbytes 4-bit models without deepspeed.zero.Init; they are quantised "
               "while each rank loads them")
# zero_optimization keys a user may set through strategy.deepspeed that size DeepSpeed's buffers (for the planner)
_BUFFER_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size",
                "stage3_max_live_parameters", "stage3_param_persistence_threshold", "sub_group_size")


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` merged over `base`, recursing into nested dicts (neither input is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_config(*, zero_stage: int, precision: str, micro_batch_size: int, grad_accum: int,
                 offload_optimizer: bool = False, offload_params: bool = False, pin_memory: bool = False,
                 extra: dict | None = None) -> dict:
    """The DeepSpeed config for one run; `extra` (strategy.deepspeed) is merged over it."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,  # placeholder: step(max_grad_norm) sets the value actually used
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch AdamW
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # the recipe logs; keep DeepSpeed's own progress lines quiet
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Both default to the model dtype (bf16); FSDP2 reduces in fp32 (reduce_dtype), so ZeRO arms of a compare
        # would differ numerically. ZeRO-2/3 then keep fp32 gradient partitions; ZeRO-1 without offload becomes
        # DeepSpeed's BF16_Optimizer (engine._do_optimizer_sanity_check): fp32 accumulation, states still sharded.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return deep_merge(config, _plain(extra or {}))


def _plain(value):
    """OmegaConf containers (strategy.deepspeed comes from Hydra) as plain dicts/lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class DeepSpeedStrategy:
    def __init__(self, *, device: torch.device, precision: str = "fp32", micro_batch_size: int = 1,
                 grad_accum: int = 1, zero_stage: int = 2, offload_optimizer: bool = False,
                 offload_params: bool = False, deepspeed: dict | None = None, rank0_load: bool | None = None,
                 **_other_strategy_options):
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"strategy.zero_stage={zero_stage}: DeepSpeed strategies use ZeRO stage 1, 2 or 3")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision={precision}: the DeepSpeed strategies run fp32 or bf16")
        self.device = device
        self.precision = precision
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        self.config = build_config(zero_stage=zero_stage, precision=precision, micro_batch_size=micro_batch_size,
                                   grad_accum=grad_accum, offload_optimizer=offload_optimizer,
                                   offload_params=offload_params, pin_memory=device.type == "cuda",
                                   extra=deepspeed)
        self.rank0_load = rank0_load  # None: on for ZeRO-3 unless the model is 4-bit
        self._engine = None
        self._scheduler = None

    @staticmethod
    def sharding(options: dict) -> Sharding:
        zero = (_plain(options.get("deepspeed") or {})).get("zero_optimization") or {}
        stage = options.get("zero_stage", 0)
        return Sharding(engine="deepspeed", shards_parameters=stage == 3, zero_stage=stage,
                        offload_params=bool(options.get("offload_params", False)),
                        offload_optimizer=bool(options.get("offload_optimizer", False)),
                        buffers={k: zero[k] for k in _BUFFER_KEYS if k in zero})

    def load_model(self, load: ModelLoader, *, rank: int, quantized: bool) -> torch.nn.Module:
        """ZeRO-3: partition while loading, weights read on rank 0 one layer group at a time (streaming.fill_zero3);
        a checkpoint that cannot be streamed goes through transformers' zero.Init load (rank 0 reads it whole)."""
        self._streamed = False
        if not settings.rank0_load(self.rank0_load, shards_parameters=self.zero_stage == 3, quantized=quantized):
            if quantized and self.zero_stage == 3:
                log.info("ZeRO-3: every rank loads the 4-bit base (%s)", _QLORA_LOAD)
            return load()
        model = load(empty=True)
        checkpoint, problem = open_checkpoint(model, rank)  # rank 0 decides; collective
        self._streamed = problem is None
        if problem is None:
            if rank == 0:
                log.info("ZeRO-3: every rank builds the model without weights; rank 0 streams them from %d safetensors "
                         "file(s) into the partitions, one decoder layer at a time", len(checkpoint.files))
            fill_zero3(model, checkpoint, rank=rank, ds_config=self.config, device=self.device,
                       layers=decoder_layers(model))
            return model
        if rank == 0:
            log.warning("ZeRO-3: the weights cannot be streamed layer by layer because %s; transformers' zero.Init "
                        "load reads the whole model on rank 0 instead", problem)
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # transformers keeps only a weak reference: the object must stay alive for the whole load, and is unset
        # afterwards so later from_pretrained calls (export check, merge) load normally on one rank.
        ds_config = HfDeepSpeedConfig(self.config)
        try:
            return load()
        finally:
            del ds_config
            unset_hf_deepspeed_config()

    # --- setup --------------------------------------------------------------------------------------------
    def prepare(self, model, build_optimizer: OptimizerBuilder, build_scheduler: SchedulerBuilder) -> None:
        import deepspeed

        if self.zero_stage == 3:
            disable_bnb_cpu_repack(model)  # a repacked gathered copy would be thrown away, its mark kept
        params = trainable_parameters(model)
        optimizer = build_optimizer(params)
        if self.offload_optimizer:
            optimizer = cpu_adam_like(optimizer, params)
        scheduler = build_scheduler(optimizer)
        # DeepSpeed steps the client scheduler once per optimizer step; ZeRO keeps the client optimizer's
        # param_group dicts, so the scheduler's learning rates reach the sharded update.
        self._engine, _, _, ds_scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=self.config)
        self._scheduler = ds_scheduler or scheduler

    @property
    def model(self) -> torch.nn.Module:
        return self._engine

    def unwrap(self) -> torch.nn.Module:
        return self._engine.module

    def local_trainable_tensors(self) -> list[torch.Tensor]:
        # A ZeRO-3 parameter's own tensor is empty outside a gather; its partition is `ds_tensor`.
        return [getattr(p, "ds_tensor", p) for p in trainable_parameters(self.unwrap())]

    # --- training step ------------------------------------------------------------------------------------
    def forward_context(self):
        return contextlib.nullcontext()  # bf16: the engine casts the module itself; fp32: nothing to do

    @contextlib.contextmanager
    def sync_context(self, sync: bool):
        # The last micro-batch of an optimizer step is the accumulation boundary: ZeRO-1 all-reduces and ZeRO-2/3
        # finish their reductions there, and `step()` then updates once.
        self._engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The recipe already divided by the global batch's answer tokens; DeepSpeed averages over workers itself.
        self._engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        self._set_clipping(max_grad_norm)
        self._engine.step()  # clip, optimizer step, scheduler step, zero grads
        norm = self._engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _set_clipping(self, max_grad_norm: float) -> None:
        value = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else 0.0
        self._engine._config.gradient_clipping = value
        if hasattr(self._engine.optimizer, "clip_grad"):  # ZeRO optimizers read it at every step
            self._engine.optimizer.clip_grad = value

    def current_lr(self) -> float:
        return float(self._scheduler.get_last_lr()[0])

    # --- checkpoints --------------------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, rank: int) -> None:
        # Collective. Every rank writes its own ZeRO shard (zero_pp_rank_<rank>_..._optim_states.pt, and under
        # ZeRO-3 zero_pp_rank_<rank>_mp_rank_00_model_states.pt); rank 0 also writes mp_rank_00_model_states.pt
        # (ZeRO-1/2: the trainable weights and the scheduler). The names never collide across ranks, so Ray can
        # merge the ranks' directories. Frozen weights (a LoRA base) are reloaded from the base model instead.
        self._engine.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, ckpt_dir: Path, rank: int) -> None:
        path, _ = self._engine.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True,
                                               load_module_strict=False)  # frozen weights were not saved
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir / TAG}")

    # --- export and generation ----------------------------------------------------------------------------
    def export(self, out_dir: Path, tokenizer, rank: int) -> None:
        """Write a plain HF model or peft adapter on rank 0 as the weights are gathered, a bounded group at a time
        (collective): no rank holds the whole model."""
        from distft.export_shards import export_plan, write_export

        module = self.unwrap()
        plan = export_plan(module, precision=self.precision)
        write_export(out_dir, module, plan, self.export_tensors(rank, plan), rank=rank, tokenizer=tokenizer)

    def export_tensors(self, rank: int, plan=None):
        """The export's tensors in plan order (collective: every rank iterates to the end); rank 0 gets CPU copies
        in the export dtype, the others None.

        ZeRO-3 gathers at most `settings.EXPORT_GATHER_NUMEL` elements' worth of parameters at a time. bf16 runs read
        the fp32 master weights of trainable parameters rather than their bf16 working copies (then cast to the export
        dtype).
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        from distft.export_shards import export_plan, state_tensors, to_export

        module = self.unwrap()
        self._release_in_flight()
        plan = plan or export_plan(module, precision=self.precision)
        named = {name: tensor for name, tensor, _ in state_tensors(module)}
        items = [(item, named[item.sources[0]]) for item in plan.tensors]
        numel = lambda pair: getattr(pair[1], "ds_numel", pair[1].numel())  # noqa: E731  (partitioned: whole size)
        for chunk in _chunks(items, settings.EXPORT_GATHER_NUMEL, numel=numel):
            params = list({id(t): t for _, t in chunk if isinstance(t, torch.nn.Parameter)}.values())
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero_stage == 3 \
                else contextlib.nullcontext()
            with gather:
                for item, tensor in chunk:
                    master = None
                    if self.precision != "fp32" and isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                        master = safe_get_full_fp32_param(tensor)  # collective under ZeRO
                    yield item, (to_export(master if master is not None else tensor, item) if rank == 0 else None)
                    del master

    @property
    def shards_parameters(self) -> bool:
        return self.zero_stage == 3

    @contextlib.contextmanager
    def generation_context(self, gather: bool = True):
        """ZeRO-1/2: the module itself (every rank holds all weights). ZeRO-3: every rank gathers the full weights
        for the duration and the ZeRO-3 fetch/release hooks are detached, so `generate` runs without collectives
        and ranks may take different numbers of decoding steps. The whole model must fit in one device's
        memory next to the training state. gather=False: ZeRO-3's own hooks fetch and release each module's
        weights around its forward, and the ranks decode in step (`synced_gpus`)."""
        module = self.unwrap()
        if self.zero_stage < 3 or not gather:
            yield module
            return
        import deepspeed

        offload = self._engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            _detach_zero3_hooks(offload)
            try:
                yield module
            finally:
                _attach_zero3_hooks(offload)

    def _release_in_flight(self) -> None:
        """ZeRO-3: a forward just before (evaluation, the export's probe) can leave prefetched parameters in flight,
        and gathering some of them then fails on leaving ("Cannot partition a param in flight"); release them all
        first. (Gathering every parameter at once, as `generation_context` does, was seen to pass.)"""
        if self.zero_stage == 3:
            self._engine.empty_partition_cache()

    # --- configuration checks -----------------------------------------------------------------------------
    @staticmethod
    def config_problems(*, method: str, precision: str, use_gpu: bool, options: dict,
                        quant_storage: str | None = None) -> list[str]:
        """Combinations that cannot run, each naming the key, the reason and an alternative."""
        problems = []
        stage = options.get("zero_stage", 0)
        name = options.get("name", "zero*")
        if stage not in (1, 2, 3):
            problems.append(f"strategy.zero_stage={stage}: strategy={name} needs ZeRO stage 1, 2 or 3 "
                            "(use strategy=zero1, zero2 or zero3)")
        if options.get("offload_params") and stage != 3:
            problems.append(f"strategy.offload_params=true needs ZeRO stage 3 (strategy.zero_stage={stage}): only "
                            "ZeRO-3 partitions parameters; use strategy=zero3_offload")
        if options.get("rank0_load") and stage != 3:
            problems.append(f"strategy.rank0_load=true needs ZeRO stage 3 (strategy.zero_stage={stage}): ZeRO-1/2 keep "
                            "whole weights on every rank, so every rank loads them; use strategy=zero3 or remove it")
        elif options.get("rank0_load") and method == "qlora":
            problems.append(f"strategy.rank0_load=true with method=qlora: {_QLORA_LOAD}; remove strategy.rank0_load "
                            "or use method=lora")
        if stage == 3 and method == "qlora" and precision == "bf16" and quant_storage not in (None, "bf16"):
            # ZeRO-3 gathers parameters in coalesced groups that must share one dtype: 4-bit weights stored in
            # another dtype fail with "expected there to be only one unique element" (unset: bf16 is chosen)
            problems.append(f"method.quant_storage={quant_storage} with method=qlora under strategy={name} "
                            "(ZeRO-3, bf16): ZeRO-3 gathers parameters in groups of one dtype, so the packed 4-bit "
                            "weights must be stored as bf16 like the rest; set method.quant_storage=bf16 or leave it "
                            "unset, or use strategy=zero2 or strategy=fsdp")
        extra = _plain(options.get("deepspeed") or {})
        for key in sorted(set(extra) & set(RECIPE_KEYS)):
            problems.append(f"strategy.deepspeed.{key} is set by distft from {RECIPE_KEYS[key]}; set that instead "
                            f"and remove strategy.deepspeed.{key}")
        return problems


def cpu_adam_like(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
    """DeepSpeedCPUAdam with the hyper-parameters of the Adam/AdamW the recipe built (ZeRO-Offload needs it)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"strategy.offload_optimizer=true needs an Adam/AdamW optimizer, got "
                         f"{type(optimizer).__name__}; turn offload off or use AdamW")
    d = optimizer.defaults
    return DeepSpeedCPUAdam(params, lr=d["lr"], betas=tuple(d["betas"]), eps=d["eps"],
                            weight_decay=d["weight_decay"], amsgrad=d.get("amsgrad", False),
                            adamw_mode=isinstance(optimizer, torch.optim.AdamW))


def _chunks(items: list, max_numel: int, numel):
    """`items` in consecutive groups of at most `max_numel` elements by `numel(item)` (a larger item alone)."""
    chunk, total = [], 0
    for item in items:
        n = numel(item)
        if chunk and total + n > max_numel:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += n
    if chunk:
        yield chunk


def _detach_zero3_hooks(offload) -> None:
    """Remove the ZeRO-3 per-module fetch/release hooks (weights must already be gathered)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _attach_zero3_hooks(offload) -> None:
    offload._register_deepspeed_module(offload.module)  # also invalidates the recorded prefetch trace
