"""Settings derived from the config, each computed in one place: the recipe, the planner, validation and the
strategies all read them from here, so what a run does and what the planner predicts cannot drift apart."""

import math
from dataclasses import dataclass

# The `auto` rules the workers apply and the planner predicts (one place, so the two cannot drift apart):
# eval.gather=auto generates layer by layer when the full weights exceed this share of the device's free memory
GATHER_SHARE = 0.8
# run.export_check=auto reloads the export to check it when that takes at most this share of the free memory
RELOAD_SHARE = 0.5
# ZeRO-3's export gathers its partitioned parameters this many elements at a time on every rank (512 MiB in fp32)
EXPORT_GATHER_NUMEL = 2**27

# trainer.optimizer -> its bitsandbytes class (adamw is torch's own), and the bytes of optimizer state (two
# moments) per trainable parameter, for the planner
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}
OPTIMIZERS = ("adamw", *BNB_OPTIMIZERS)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}


def grad_accum(*, global_batch_size: int, micro_batch_size: int, world: int) -> int:
    """Micro-batches per worker per optimizer step."""
    return global_batch_size // (micro_batch_size * world)


def batch_problem(*, global_batch_size: int, micro_batch_size: int, world: int) -> str | None:
    """Why the global batch cannot be split into micro-batches over the workers, with the nearest sizes that can."""
    per_step = micro_batch_size * world
    if per_step < 1 or global_batch_size % per_step == 0:
        return None
    lower = max(per_step, global_batch_size // per_step * per_step)
    return (f"trainer.global_batch_size={global_batch_size} is not a multiple of trainer.micro_batch_size x "
            f"scaling.num_workers = {micro_batch_size} x {world} = {per_step}; use "
            f"trainer.global_batch_size={lower} or {lower + per_step}")


def learning_rate(*, lr: float | None, default_lr: float) -> float:
    """trainer.lr, else the method's default."""
    return lr if lr is not None else default_lr


def max_steps(*, max_steps: int | None, epochs: int, steps_per_epoch: int) -> int:
    """trainer.max_steps, else trainer.epochs over the training rows."""
    return max_steps or epochs * steps_per_epoch


def warmup_steps(*, warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int:
    """trainer.warmup_steps, else trainer.warmup_ratio of the run."""
    return warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)


def compute_dtype(*, compute: str | None, precision: str) -> str:
    """method.compute_dtype (the 4-bit layers' matmul dtype), else trainer.precision."""
    return compute or precision


def load_dtype(method: str, *, precision: str, compute: str | None = None) -> str:
    """The dtype the base weights are loaded in. Full fine-tuning keeps fp32 master weights (autocast or the engine
    does the bf16 math); frozen LoRA bases load in the compute precision to halve their memory, and QLoRA's
    unquantised parameters in the 4-bit layers' compute dtype."""
    if method == "full":
        return "fp32"
    return compute_dtype(compute=compute, precision=precision) if method == "qlora" else precision


def rank0_load(option: bool | None, *, shards_parameters: bool, quantized: bool) -> bool:
    """Whether only rank 0 reads the weights (`strategy.rank0_load`; None: on wherever parameters are sharded,
    except for 4-bit bases, which bitsandbytes quantises while each rank loads them)."""
    return shards_parameters and not quantized and option is not False


@dataclass(frozen=True)
class RunSettings:
    """What one worker derives from the config before it sees any data."""

    grad_accum: int
    lr: float
    compute_dtype: str
    load_dtype: str
    quantized: bool
    quant_storage: str | None = None  # how the packed 4-bit weights are stored (None: uint8)


def run_settings(cfg, *, world: int) -> RunSettings:
    t, m = cfg.trainer, cfg.method
    # ZeRO-3 gathers parameters in groups of one dtype: QLoRA's 4-bit weights there are stored as bf16 like the rest
    # (peft's DeepSpeed QLoRA recipe); elsewhere uint8 unless method.quant_storage says otherwise
    zero3_bf16 = cfg.strategy.get("zero_stage") == 3 and t.precision == "bf16"
    return RunSettings(
        grad_accum=grad_accum(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                              world=world),
        lr=learning_rate(lr=t.lr, default_lr=m.default_lr),
        compute_dtype=compute_dtype(compute=m.compute_dtype, precision=t.precision),
        load_dtype=load_dtype(m.name, precision=t.precision, compute=m.compute_dtype),
        quantized=m.name == "qlora",
        quant_storage=m.quant_storage or ("bf16" if m.name == "qlora" and zero3_bf16 else None),
    )
