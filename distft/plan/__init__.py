"""`python -m distft.plan`: will a run fit, how fast will it go, what will it cost — from the same Hydra config as
training, without the hub, the weights or a GPU.

`plan_config(cfg)` is the whole prediction for one composed config; `predict_run` its compact form that every
training run writes into summary.json next to the measured peaks; `alternatives` ranks other settings for the same
model and worker count.
"""

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distft import settings
from distft.errors import UserError
from distft.plan.memory import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT_BYTES,
    GiB,
    MemoryInputs,
    MemoryPlan,
    estimate_memory,
)
from distft.plan.shapes import ModelShape, model_shape
from distft.plan.throughput import flops_per_token, offload_seconds_per_step

if TYPE_CHECKING:  # distft.strategy imports torch: imported where a plan is made, not with the package
    from distft.strategy import Sharding

__all__ = ["Plan", "PlanRefused", "MemoryInputs", "plan_config", "predict_run", "prediction", "alternatives",
           "memory_inputs", "model_shape", "estimate_memory", "check_plan", "refusal"]


class PlanRefused(UserError):
    """The plan says this run does not fit (and plan.enforce is on)."""


@dataclass
class Plan:
    shape: ModelShape
    memory: MemoryPlan
    accelerator: str
    world: int
    capacity_bytes: int | None  # per worker: GPU memory, or this node's RAM shared by its workers
    need_bytes: int  # the peak plus what lives outside torch's allocator (GPU)
    fits: bool | None
    flops_per_token: float
    tokens_per_second: float | None
    throughput_source: str
    settings: dict = field(default_factory=dict)
    offload_seconds: float = 0.0  # per optimizer step: host<->GPU copies and the CPU optimizer step (GPU only)
    tokens_per_step: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def train(self) -> dict:
        return self.memory.train

    def step_seconds(self, tokens_per_step: int) -> float | None:
        return tokens_per_step / self.tokens_per_second if self.tokens_per_second else None


def memory_inputs(cfg) -> MemoryInputs:
    """What the planner's memory model reads from a composed config."""
    from distft.strategy import strategy_sharding

    t, m, hw = cfg.trainer, cfg.method, cfg.hardware
    sharding = strategy_sharding(cfg.strategy.name, dict(cfg.strategy))
    world = cfg.scaling.num_workers
    return MemoryInputs(
        method=m.name, sharding=sharding, world=world, precision=t.precision,
        micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len, packing=cfg.data.packing,
        gradient_checkpointing=t.gradient_checkpointing, lora_r=m.lora_r, lora_dropout=m.lora_dropout,
        target_modules=tuple(m.target_modules), double_quant=m.double_quant, accelerator=hw.accelerator,
        eval_enabled=cfg.eval.enabled, eval_batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        eval_gather=cfg.eval.gather, export_check=cfg.run.export_check,
        device_bytes=int(hw.gpu_memory_gb * GiB) if hw.accelerator == "cuda" and hw.gpu_memory_gb else None,
        export=cfg.run.export, gpus_per_node=gpus_per_node(cfg),
        rank0_load=settings.rank0_load(cfg.strategy.rank0_load, shards_parameters=sharding.shards_parameters,
                                       quantized=m.name == "qlora"),
        cpu_malloc_pinned="MALLOC_MMAP_THRESHOLD_" in cfg.run.env, optimizer=t.optimizer,
        loss_chunk_tokens=t.loss_chunk_tokens)


def gpus_per_node(cfg) -> int:
    """Workers of this run on one node: a node has hardware.gpus_per_node GPUs, but a run of fewer workers uses only
    that many (gpu_1x: one); CPU workers all share this machine."""
    world = cfg.scaling.num_workers
    return max(1, min(cfg.hardware.gpus_per_node, world)) if cfg.hardware.accelerator == "cuda" else world


def plan_config(cfg, *, model_dir: str | None = None, shape: ModelShape | None = None,
                measured: "Plan | None" = None) -> Plan:
    """Predict memory, fit and throughput for a composed training config. A measured hardware.tokens_per_second
    belongs to the configured settings; for other settings pass that config's plan (`measured`): its measured step
    time, less its offload transfers, is scaled by the FLOPs ratio, and this config's offload transfers added."""
    shape = shape or model_shape(cfg.model, model_dir)
    t, m, hw = cfg.trainer, cfg.method, cfg.hardware
    world = cfg.scaling.num_workers
    accelerator = hw.accelerator
    inputs = memory_inputs(cfg)
    mem = estimate_memory(shape, inputs)
    if accelerator == "cuda":
        capacity = int(hw.gpu_memory_gb * GiB) if hw.gpu_memory_gb else None
        need = int(mem.peak_bytes * (1 + ALLOCATOR_OVERHEAD)) + CUDA_CONTEXT_BYTES
    else:  # CPU workers of one machine share its RAM
        total = hw.host_memory_gb * GiB if hw.host_memory_gb else _physical_memory()
        capacity = int(total / world) if total else None
        need = mem.peak_bytes
    fits = None if capacity is None else need <= capacity
    if fits and hw.host_memory_gb and accelerator == "cuda":
        fits = max(mem.host_per_node_load, mem.host_per_node_restore) <= hw.host_memory_gb * GiB
    fpt = flops_per_token(shape, method=m.name, seq_len=cfg.data.seq_len,
                          gradient_checkpointing=t.gradient_checkpointing, lora_params=mem.lora_params)
    offload = _offload_seconds(cfg, mem, inputs.sharding)
    tps, source = _tokens_per_second(cfg, fpt, world, offload, measured)
    return Plan(shape=shape, memory=mem, accelerator=accelerator, world=world, capacity_bytes=capacity,
                need_bytes=need, fits=fits, flops_per_token=fpt, tokens_per_second=tps, throughput_source=source,
                settings={"model": cfg.model.name, "method": m.name, "strategy": cfg.strategy.name,
                          "micro_batch_size": t.micro_batch_size, "seq_len": cfg.data.seq_len,
                          "gradient_checkpointing": t.gradient_checkpointing, "precision": t.precision},
                offload_seconds=offload, tokens_per_step=t.global_batch_size * cfg.data.seq_len)


def _offload_seconds(cfg, mem: MemoryPlan, sharding: "Sharding") -> float:
    """Seconds per optimizer step for offloaded states (GPU workers; on CPU workers nothing crosses a bus)."""
    if cfg.hardware.accelerator != "cuda":
        return 0.0
    t, world = cfg.trainer, cfg.scaling.num_workers
    micro_steps = max(1, settings.grad_accum(global_batch_size=t.global_batch_size,
                                             micro_batch_size=t.micro_batch_size, world=world))
    return offload_seconds_per_step(trainable=mem.trainable_params, module_bytes=mem.total_params * 2, world=world,
                                    micro_steps=micro_steps, offload_optimizer=sharding.offload_optimizer,
                                    offload_params=sharding.offload_params)


def _tokens_per_second(cfg, fpt: float, world: int, offload: float,
                       measured: "Plan | None") -> tuple[float | None, str]:
    hw, t = cfg.hardware, cfg.trainer
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    transfers = " + offload transfers" if offload else ""
    if hw.tokens_per_second:
        step = tokens_per_step / float(hw.tokens_per_second)  # the measured settings' step time
        if measured is None or (measured.flops_per_token == fpt and measured.offload_seconds == offload):
            return float(hw.tokens_per_second), "measured (hardware.tokens_per_second)"
        compute = max(step - measured.offload_seconds, step * 0.05) * fpt / measured.flops_per_token
        return tokens_per_step / (compute + offload), \
            f"measured (hardware.tokens_per_second) scaled by FLOPs per token{transfers}"
    if not hw.peak_tflops:
        return None, "no estimate: set hardware.peak_tflops (and hardware.mfu) or hardware.tokens_per_second"
    compute = world * hw.mfu * hw.peak_tflops * 1e12 / fpt
    step = tokens_per_step / compute + offload
    return tokens_per_step / step, f"MFU {hw.mfu:g} x {hw.peak_tflops:g} TFLOP/s per GPU{transfers}"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def predict_run(cfg, *, model_dir: str | None = None) -> dict:
    """The prediction every training run records in summary.json (and W&B) next to its measured peaks."""
    return prediction(plan_config(cfg, model_dir=model_dir))


def prediction(plan: Plan) -> dict:
    """`predict_run`'s record of a plan already made."""
    mem = plan.memory
    return {
        "peak_bytes": plan.peak_bytes,
        "peak_bytes_rank0": mem.peak_for("rank0"),
        "peak_bytes_other_ranks": mem.peak_for("other"),
        "peak_phase": mem.peak_phase,
        "phases": {k: v for k, v in mem.phases.items()},
        "components": dict(mem.train),
        "measured_as": "peak CUDA memory allocated" if plan.accelerator == "cuda" else "peak resident memory (RSS)",
        "need_bytes": plan.need_bytes,
        "capacity_bytes": plan.capacity_bytes,
        "fits": plan.fits,
        "host_per_node_load_bytes": mem.host_per_node_load,
        "host_per_node_restore_bytes": mem.host_per_node_restore,
        "total_params": mem.total_params,
        "trainable_params": mem.trainable_params,
    }


def alternatives(cfg, *, shape: ModelShape | None = None, top: int = 5,
                 methods: list[str] | None = None) -> list[tuple[list[str], Plan]]:
    """Feasible settings for the same model and worker count, fastest first (then smallest peak): strategy
    (with offload), method (`methods`: only these; None: every method the model supports), micro-batch and
    activation checkpointing. Returns (Hydra overrides, plan) pairs. Validated as the cluster would run them,
    whatever optional packages are installed here (DeepSpeed, bitsandbytes)."""
    from omegaconf import OmegaConf

    from distft.config import preset, validate_config
    from distft.errors import ConfigError
    from distft.methods import METHODS
    from distft.strategy import STRATEGIES

    shape = shape or model_shape(cfg.model)
    reference = plan_config(cfg, shape=shape)
    per_worker = cfg.trainer.global_batch_size // cfg.scaling.num_workers
    micro_sizes = [mb for mb in (1, 2, 4, 8, 16, 32) if per_worker % mb == 0] or [cfg.trainer.global_batch_size]
    methods = [m for m in (METHODS if methods is None else methods) if cfg.model.supports_4bit or m != "qlora"]
    out = []
    for strategy in STRATEGIES:
        for method in methods:
            for mb in micro_sizes:
                for gc in (False, True):
                    alt = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
                    OmegaConf.set_struct(alt, False)
                    alt.strategy = preset("strategy", strategy)
                    if method != cfg.method.name:
                        alt.method = preset("method", method)
                    alt.trainer.micro_batch_size = mb
                    alt.trainer.gradient_checkpointing = gc
                    try:
                        validate_config(alt, installed=False)
                    except ConfigError:
                        continue
                    plan = plan_config(alt, shape=shape, measured=reference)
                    if plan.fits is False:
                        continue
                    overrides = [f"strategy={strategy}", f"method={method}", f"trainer.micro_batch_size={mb}",
                                 f"trainer.gradient_checkpointing={str(gc).lower()}"]
                    out.append((overrides, plan))
    # Fastest first; without a throughput estimate, the cheapest in FLOPs per token; then larger micro-batches
    # (better kernels) and the smaller peak.
    out.sort(key=lambda item: (-(item[1].tokens_per_second or 0), item[1].flops_per_token,
                               "offload" in item[0][0], -item[1].settings["micro_batch_size"], item[1].peak_bytes))
    return out[:top]


# --- the check before launching ----------------------------------------------------------------------------

def changed_overrides(cfg, overrides: list[str]) -> list[str]:
    """The alternative's overrides that differ from this config (what to paste)."""
    current = {"strategy": cfg.strategy.name, "method": cfg.method.name,
               "trainer.micro_batch_size": str(cfg.trainer.micro_batch_size),
               "trainer.gradient_checkpointing": str(cfg.trainer.gradient_checkpointing).lower()}
    return [o for o in overrides if current.get(o.split("=", 1)[0]) != o.split("=", 1)[1]]


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 10 * GiB else f"{n / GiB:.2f} GiB"


def refusal(cfg, plan: Plan) -> str | None:
    """Why the plan says this run does not fit and what fits instead, or None (it fits, or the capacity is
    unknown: fits None never refuses)."""
    if plan.fits is not False:
        return None
    hw, mem = cfg.hardware, plan.memory
    if plan.capacity_bytes is not None and plan.need_bytes > plan.capacity_bytes:
        if plan.accelerator == "cuda":
            what = (f"needs {_gib(plan.need_bytes)} per worker (peak {_gib(plan.peak_bytes)} in phase "
                    f"'{mem.peak_phase}' + CUDA context and allocator overhead) but hardware.gpu_memory_gb="
                    f"{hw.gpu_memory_gb:g} gives {_gib(plan.capacity_bytes)}")
        else:
            total = f"hardware.host_memory_gb={hw.host_memory_gb:g}" if hw.host_memory_gb else "this machine's RAM"
            what = (f"needs {_gib(plan.need_bytes)} per worker (peak in phase '{mem.peak_phase}') but {total} "
                    f"shared by {plan.world} workers gives {_gib(plan.capacity_bytes)} each")
    else:
        per_node = gpus_per_node(cfg)
        loading = mem.host_per_node_load >= mem.host_per_node_restore
        what = (f"needs {_gib(max(mem.host_per_node_load, mem.host_per_node_restore))} of host RAM per node "
                f"while {'loading' if loading else 'resuming from a checkpoint'} "
                f"({per_node} worker{'s' if per_node > 1 else ''} per node) but hardware.host_memory_gb="
                f"{hw.host_memory_gb:g}")
    lines = [f"the plan says this run does not fit: it {what} "
             f"({plan.settings['model']}, method={plan.settings['method']}, strategy={plan.settings['strategy']})."]
    try:
        same = alternatives(cfg, shape=plan.shape, top=1, methods=[cfg.method.name])
        other = [] if same else alternatives(cfg, shape=plan.shape, top=1)
    except Exception as e:  # noqa: BLE001 - the refusal stands; only the suggestion is missing
        same, other = [], []
        lines.append(f"(no alternative could be computed: {type(e).__name__}: {e})")
    for overrides, alt in same:
        lines.append(f"Fits with the same method ({cfg.method.name}): {' '.join(changed_overrides(cfg, overrides))} "
                     f"(peak {_gib(alt.peak_bytes)} per worker).")
    if not same:
        lines.append(f"No setting of strategy, micro-batch or activation checkpointing fits with method="
                     f"{cfg.method.name} on {plan.world} worker{'s' if plan.world > 1 else ''}.")
        for overrides, alt in other:
            lines.append(f"With another method: {' '.join(changed_overrides(cfg, overrides))} "
                         f"(peak {_gib(alt.peak_bytes)} per worker).")
        if not other:
            lines.append("Nothing fits: more workers, a larger GPU, or a smaller model." if plan.accelerator == "cuda"
                         else "Nothing fits: a machine with more RAM, fewer workers, or a smaller model.")
    lines.append("`python -m distft.plan` with the same overrides shows the breakdown and more alternatives; "
                 "plan.enforce=false runs it anyway.")
    return "\n".join(lines)


def check_plan(cfg, model_dir: str | None = None) -> tuple[dict, str | None]:
    """The prediction for this run (summary.json's `plan`) and, when it does not fit, the refusal message.
    Raises PlanRefused when it does not fit and plan.enforce is on; any other exception is a planner failure
    (the caller decides; training must not stop for it)."""
    plan = plan_config(cfg, model_dir=model_dir)
    message = refusal(cfg, plan)
    if message and cfg.plan.enforce:
        raise PlanRefused(message)
    return prediction(plan), message
