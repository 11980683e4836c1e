"""Per-worker memory of a fine-tuning run, by component and by phase (load, train, eval/generation, checkpoint save,
export), from the model's shape and the run's settings. Every formula follows what distft's code path does (the
docstrings say which line of which library); docs/planner.md derives them and bench/bench_plan.py checks them.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distft import settings
from distft.plan.shapes import ModelShape

if TYPE_CHECKING:  # distft.strategy imports torch; the planner itself needs neither
    from distft.strategy.base import Sharding

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of the config's dtype names

# DeepSpeed ZeRO defaults (deepspeed.runtime.zero.config.DeepSpeedZeroConfig; pinned by a unit test) for the keys
# distft's generated config leaves unset.
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                 "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                 "stage3_param_persistence_threshold": 100_000, "sub_group_size": 1_000_000_000}
# ZeRO-3's optimizer step on one sub-group of fp32 partitions, in partition sizes above the steady state: its
# flattened gradient copy (stage3._prepare_fp32_grad_for_sub_group), AdamW's foreach temporaries and freed memory
# the allocator keeps. Measured on CPU, 0.35B full fine-tuning (bench/bench_scale.py, docs/benchmarks.md "Loading at
# scale"): 4.56 on both ranks in docs/results/scale_cpu.json, 4.15 and 4.7 in an earlier run; the largest is used.
ZERO3_STEP_PARTITIONS = 4.7
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
DQ_BLOCK = 256  # double quantisation: the absmax values are quantised to 8 bits in blocks of 256
# Activation elements saved per token and decoder layer (see docs/planner.md; measured with saved-tensor hooks on
# transformers' LlamaDecoderLayer with sdpa attention, exact to 0.1% for SmolLM2's shape).
MASK_BYTES_PER_POSITION_PAIR = 10  # packed rows: sdpa keeps a float copy of the block-diagonal mask per layer
# LoRA dropout: per dropped-out input element, beyond the element itself (the bool mask and what autograd keeps
# with it); measured with saved-tensor hooks, 1.85 for SmolLM2's shape and for a 128-wide probe alike.
DROPOUT_MASK_BYTES = 1.85
HEAD_EXTRA_BYTES = 12  # per logit: fp32 copy for the loss, log-softmax output, and their gradients at backward
# Prompt length assumed for the generation KV cache (GSM8K questions with the chat template are under 256 tokens).
PROMPT_TOKENS = 256
# Runtime memory of a CPU worker process before any model (Python, torch, transformers, Ray, gloo), and what the
# libraries imported later add; measured by `python bench/bench_plan.py --baseline` (docs/benchmarks.md).
CPU_RUNTIME_BYTES = {"base": int(0.45 * GiB), "transformers": int(0.16 * GiB), "deepspeed": int(0.17 * GiB)}
# GPU: memory outside torch's allocator counts against the card but not against max_memory_allocated.
# DDP's start-up broadcast of rank 0's weights (torch's _sync_module_states) flattens them into 250 MiB buckets; two are
# alive at once (measured: 0.50 GiB above the loaded model on SmolLM2 and 0.62 GiB at 3.4B, docs/benchmarks.md); a
# model smaller than a bucket fills one bucket of its own size
DDP_SYNC_BUCKET = 250 * 2**20
# Largest checkpoint tensors a worker holds in host memory while a device_map load puts the weights on its GPU:
# transformers 5 reads with 4 threads (core_model_loading.GLOBAL_WORKERS), one tensor each; under bitsandbytes'
# on-the-fly quantisation one tensor at a time, counted twice: a QLoRA load of a 3.4B model on CPU peaked 1.6 largest
# tensors above the model it kept, the quantiser's temporaries included (bench/bench_qlora_load.py)
DEVICE_MAP_READERS = 4
QLORA_IN_FLIGHT = 2
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/NCCL workspaces (docs/planner.md, sources)
ALLOCATOR_OVERHEAD = 0.05  # caching-allocator fragmentation, as a fraction of the allocated peak


def qlora_bytes_per_param(double_quant: bool) -> float:
    """NF4: 4 bits per weight plus one absmax per 64 weights (fp32, or 8-bit with fp32 second-level constants
    per 256 blocks under double quantisation): 0.5159 bytes/param with double quant, 0.5625 without."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


@dataclass
class MemoryPlan:
    """Bytes per worker. `train` holds the components of the training step; `phases` the peak of each phase for
    rank 0 and for the other ranks (rank 0 writes checkpoints and exports); `host_per_node_load` the host RAM a
    node needs while its workers load the model, `host_per_node_restore` while they resume from a checkpoint."""

    train: dict[str, int]
    phases: dict[str, dict[str, int]]
    host_per_node_load: int
    host_per_node_restore: int = 0
    notes: list[str] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    lora_params: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(max(p.values()) for p in self.phases.values())

    def peak_for(self, role: str) -> int:
        return max(p[role] for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: max(self.phases[k].values()))


@dataclass(frozen=True)
class MemoryInputs:
    """The settings of a run that decide its memory (what `plan_config` reads from the config)."""

    method: str  # full | lora | qlora
    sharding: "Sharding"  # what the strategy shards and offloads (`Strategy.sharding`)
    world: int
    precision: str
    micro_batch_size: int
    seq_len: int
    packing: bool = True
    gradient_checkpointing: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    double_quant: bool = True
    accelerator: str = "cuda"
    eval_enabled: bool = True
    eval_batch_size: int = 16
    max_new_tokens: int = 256
    eval_gather: str = "auto"  # eval.gather: full | layerwise | auto (distft.eval.evaluate.generates_layerwise)
    device_bytes: int | None = None  # one GPU's memory (hardware.gpu_memory_gb), for the `auto` settings
    export_check: str = "auto"  # run.export_check: logits | tensors | auto (distft.export.choose_export_check)
    export: bool = True
    gpus_per_node: int = 8  # workers of this run on one node (memory_inputs: min(hardware.gpus_per_node, world))
    rank0_load: bool = False
    cpu_malloc_pinned: bool = True
    loss_chunk_tokens: int | None = None  # trainer.loss_chunk_tokens
    optimizer: str = "adamw"  # trainer.optimizer (8-bit moments: 2 bytes per parameter; sharded engines: adamw only)

    @property
    def act_bytes(self) -> int:
        """Bytes per element of the compute dtype."""
        return _dtype_bytes(self.precision)

    @property
    def load_bytes(self) -> int:
        """Bytes per element of the dtype the base weights are loaded in (distft.settings.load_dtype)."""
        return _dtype_bytes(settings.load_dtype(self.method, precision=self.precision))

    @property
    def zero_config(self) -> dict:
        return {**ZERO_DEFAULTS, **self.sharding.buffers}


@dataclass(frozen=True)
class Weights:
    """The model's parameters as one worker holds them (after sharding), with the counts the other terms use."""

    total: int  # parameters of the base model
    lora: int  # LoRA parameters (0 for full fine-tuning)
    quantized: int  # parameters stored in 4 bits (QLoRA's linears)
    trainable: int
    module_bytes: int  # the whole module before sharding (base + adapters)
    per_param: float  # module bytes per parameter
    persistent: int  # ZeRO-3 parameters kept whole on every rank
    weights: int  # base weights held by this worker
    lora_held: int  # adapter weights held by this worker (ZeRO-3: counted in `weights`)
    host_offloaded: int = 0  # parameters moved to host memory by offloading


@dataclass
class EngineState:
    """Gradients, optimizer states and the engine's communication buffers on one worker."""

    gradients: int
    optimizer: int
    buffers: int
    host_offloaded: int = 0
    step: int = 0  # temporaries of the optimizer step, after the activations are freed
    notes: list[str] = field(default_factory=list)


def estimate_memory(shape: ModelShape, inputs: MemoryInputs) -> MemoryPlan:
    """Per-worker memory of one run, by training-step component and by phase."""
    x = inputs
    w = module_weights(shape, x)
    state = ENGINE_STATES[x.sharding.engine](shape, x, w)
    notes = list(state.notes)
    proc = process_bytes(shape, x, w, notes)
    train = train_components(shape, x, w, state, proc)
    steady = steady_bytes(x, w, state, proc)
    phases, host_per_node = load_phase(shape, x, w, host_offloaded=w.host_offloaded + state.host_offloaded,
                                       runtime=proc.runtime, mapped_load=proc.mapped_load, notes=notes)
    phases["train"] = _every_rank(sum(train.values()))
    if x.eval_enabled:
        phases["eval"] = _every_rank(eval_peak(shape, x, w, steady=steady, notes=notes))
    phases.update(save_and_export_phases(shape, x, w, steady=steady, load_device=load_device_bytes(x, w),
                                         notes=notes))
    restore = restore_host_bytes(x, w)
    if x.accelerator == "cpu":  # CPU workers: what the resume reads is host memory beside the steady state
        phases["restore"] = _every_rank(steady + restore)
        host_per_node_restore = x.gpus_per_node * (steady + restore)
    else:
        offloaded = w.host_offloaded + state.host_offloaded
        host_per_node_restore = x.gpus_per_node * (restore + offloaded)
    return MemoryPlan(train=train, phases=phases, host_per_node_load=host_per_node, notes=notes,
                      host_per_node_restore=host_per_node_restore, total_params=w.total,
                      trainable_params=w.trainable, lora_params=w.lora)


def restore_host_bytes(x: MemoryInputs, w: Weights) -> int:
    """Host memory a worker reads a checkpoint into while resuming, beside the state it restores. DeepSpeed loads
    the rank's ZeRO optimizer file (the fp32 weights and Adam moments of its partition) whole with
    map_location='cpu' (engine._get_all_zero_checkpoint_state_dicts) before copying it into the partitions: measured
    +1.9 GiB a rank at 0.35B under ZeRO-3 (docs/benchmarks.md, "Loading at scale"). DDP reads the trainable weights
    with safetensors' load_file (a CPU copy). DCP (FSDP) reads into the shards in place (+0.2 GiB measured)."""
    if x.sharding.engine == "deepspeed":
        return w.trainable * 12 // x.world
    if x.sharding.engine == "ddp":
        return w.trainable * 4
    return 0


def module_weights(shape: ModelShape, x: MemoryInputs) -> Weights:
    """Weights as the module holds them, then this worker's part.

    Full: fp32 master weights (distft.settings.load_dtype); LoRA: frozen base in the compute dtype, adapters fp32
    (peft's autocast_adapter_dtype); QLoRA: NF4 linears, and the rest upcast to fp32 by
    prepare_model_for_kbit_training. The DeepSpeed bf16 engine casts the whole module to bf16.
    """
    pb = x.act_bytes
    n_total = shape.total_params()
    lora = shape.lora_params(x.lora_r, list(x.target_modules)) if x.method != "full" else 0
    quant = shape.quantized_params() if x.method == "qlora" else 0
    master = 2 if _deepspeed_bf16(x) else 4
    if x.method == "full":
        base_bytes, adapter_bytes = n_total * master, 0
    elif x.method == "lora":
        base_bytes, adapter_bytes = n_total * pb, lora * master
    else:
        base_bytes = int(quant * qlora_bytes_per_param(x.double_quant)) + (n_total - quant) * master
        adapter_bytes = lora * master
    module_bytes = base_bytes + adapter_bytes
    per_param = module_bytes / max(n_total + lora, 1)
    zero3 = x.sharding.engine == "deepspeed" and x.sharding.zero_stage == 3
    persistent = _zero3_persistent_bytes(shape, x.method, x.lora_r, x.target_modules, x.zero_config, per_param) \
        if zero3 else 0
    weights, lora_held, host_offloaded = _worker_share(x, base_bytes, adapter_bytes, persistent)
    return Weights(total=n_total, lora=lora, quantized=quant, trainable=n_total if x.method == "full" else lora,
                   module_bytes=module_bytes, per_param=per_param, persistent=persistent, weights=weights,
                   lora_held=lora_held, host_offloaded=host_offloaded)


def _worker_share(x: MemoryInputs, base_bytes: int, adapter_bytes: int, persistent: int) -> tuple[int, int, int]:
    """This worker's part of the module: (base weights, adapters, bytes moved to host memory)."""
    s, world = x.sharding, x.world
    if not s.shards_parameters:
        weights, lora_held = base_bytes, adapter_bytes
    elif s.engine == "deepspeed":  # ZeRO-3 partitions adapters and base alike (counted in weights), except the
        # persistent parameters, which stay whole on every rank
        weights, lora_held = (base_bytes + adapter_bytes - persistent) // world + persistent, 0
    else:  # FSDP
        weights, lora_held = base_bytes // world, adapter_bytes // world
    if s.offload_params:  # parameters live in host memory between uses (ZeRO-3 keeps the persistent ones)
        return persistent, 0, weights + lora_held
    return weights, lora_held, 0


def ddp_state(shape: ModelShape, x: MemoryInputs, w: Weights) -> EngineState:
    return EngineState(gradients=w.trainable * 4,
                       optimizer=w.trainable * settings.OPTIMIZER_STATE_BYTES[x.optimizer],  # AdamW exp_avg + exp_avg_sq
                       buffers=0)  # gradient_as_bucket_view: the gradients are the buckets DDP all-reduces


def fsdp_state(shape: ModelShape, x: MemoryInputs, w: Weights) -> EngineState:
    """Sharded fp32 gradients (reduce dtype fp32) and AdamW states; one decoder layer gathered plus the next one
    prefetched; the root (embeddings, norm, LM head) stays gathered; the layer's unsharded gradients before
    reduce-scatter. Full fine-tuning reduce-scatters every micro-batch; LoRA/QLoRA accumulate their adapters'
    gradients unsharded across micro-batches (FSDPStrategy.sync_context)."""
    pb = x.act_bytes
    layer = shape.layer_params()
    gathered_dtype = pb if x.method != "qlora" else w.per_param
    root_dtype = pb if x.method == "full" else w.per_param
    layer_trainable = layer if x.method == "full" else w.lora // max(shape.layers, 1)
    grads = w.trainable * 4 // (x.world if x.method == "full" else 1)
    state = EngineState(gradients=grads, optimizer=w.trainable * 8 // x.world,
                        buffers=int(2 * layer * gathered_dtype + shape.root_params() * root_dtype
                                    + layer_trainable * 4))
    state.notes.append(f"FSDP: all-gather of one decoder layer {layer * gathered_dtype / GiB:.3f} GiB (x2 with the "
                       f"prefetched next layer); the root (embeddings, norm, LM head) stays gathered: "
                       f"{shape.root_params() * root_dtype / GiB:.3f} GiB")
    if x.sharding.offload_optimizer:  # cpu_offload: gradients and the optimizer step on the host
        state.host_offloaded, state.gradients, state.optimizer = state.gradients + state.optimizer, 0, 0
    return state


def deepspeed_state(shape: ModelShape, x: MemoryInputs, w: Weights) -> EngineState:
    """ZeRO: fp32 master copy + Adam moments partitioned (12 bytes/param / N, ZeRO paper), kept even in fp32
    training (DeepSpeed clones the fp32 partition). Gradients accumulate in fp32 and are reduced in fp32 in bf16 runs
    too (distft.strategy.deepspeed.build_config sets data_types.grad_accum_dtype and communication_data_type). The
    gradient bucket is allocated at its full configured size whatever the model's size (stage3.py:
    `torch.empty(self.reduce_bucket_size, dtype=<communication dtype>)`; stage_1_and_2.py setup_buckets, in the
    model dtype under ZeRO-2, two with overlap_comm): 2 GB in fp32 at the default 5e8 elements, even for a LoRA run.
    bf16 ZeRO-1 without offload runs DeepSpeed's BF16_Optimizer instead (engine._do_optimizer_sanity_check): an
    fp32 gradient buffer as large as the trainable parameters plus their bf16 gradients, all-reduced in place."""
    stage, zc = x.sharding.zero_stage, x.zero_config
    bf16 = _deepspeed_bf16(x)
    bucket_bytes = 2 if bf16 and stage == 2 else 4
    n_buckets = 2 if stage < 3 and zc.get("overlap_comm", False) else 1
    reduce_bucket = zc["reduce_bucket_size"] * bucket_bytes * n_buckets
    if stage == 1:  # whole fp32 gradients; under bf16 the module's bf16 .grad next to them
        grads = w.trainable * (6 if bf16 else 4)
        if bf16 and not x.sharding.offload_optimizer:
            reduce_bucket = 0  # BF16_Optimizer all-reduces its fp32 buffer itself
    else:  # fp32 partitions (ZeRO-3: the fp32 copy for the step is made per sub-group, after activations are gone)
        grads = w.trainable * 4 // x.world
    state = EngineState(gradients=grads, optimizer=w.trainable * 12 // x.world, buffers=reduce_bucket)
    if stage == 3 and not x.sharding.offload_optimizer:
        state.step = int(ZERO3_STEP_PARTITIONS * min(zc["sub_group_size"], w.trainable // x.world) * 4)
    state.notes.append(f"DeepSpeed: reduce_bucket_size {zc['reduce_bucket_size']:.3g} elements, allocated whole: "
                       f"{reduce_bucket / GiB:.2f} GiB (strategy.deepspeed={{zero_optimization:{{reduce_bucket_size:N}}}} "
                       "to shrink it)")
    if stage == 3:
        biggest = max(shape.layer_params(), shape.embedding_params())
        live = min(zc["stage3_max_live_parameters"], 2 * biggest, biggest + zc["stage3_prefetch_bucket_size"])
        state.buffers += int(live * w.per_param)  # gathered layer(s) during forward/backward
        state.notes.append(f"ZeRO-3: gathered working set {live * w.per_param / GiB:.3f} GiB (prefetch bucket "
                           f"{zc['stage3_prefetch_bucket_size']:.3g}, max live {zc['stage3_max_live_parameters']:.3g} "
                           f"elements); persistent (unpartitioned) parameters {w.persistent / GiB:.3f} GiB")
    if x.sharding.offload_optimizer:
        state.host_offloaded = state.optimizer + w.trainable * 4 // x.world
        state.optimizer = 0
        state.gradients = 0 if stage >= 2 else state.gradients
    return state


ENGINE_STATES = {"ddp": ddp_state, "fsdp": fsdp_state, "deepspeed": deepspeed_state}  # by Sharding.engine


@dataclass(frozen=True)
class ProcessBytes:
    """What a CPU worker's resident memory holds beyond the model's tensors (all zero on GPU: device memory)."""

    runtime: int = 0  # the Python process before any model
    mapped_load: int = 0  # pages of the weights file resident while loading
    mapped: int = 0  # ... and afterwards


def process_bytes(shape: ModelShape, x: MemoryInputs, w: Weights, notes: list[str]) -> ProcessBytes:
    if x.accelerator != "cpu":
        return ProcessBytes()
    if not x.cpu_malloc_pinned:
        # glibc raises its mmap threshold after the first large free, and freed heap memory then stays resident:
        # peak RSS exceeds peak live bytes by an amount that depends on allocation order (docs/benchmarks.md)
        notes.append("CPU: run.env.MALLOC_MMAP_THRESHOLD_ is not set (glibc's dynamic threshold, hardware=cpu's "
                     "default: faster steps), so freed memory may stay resident and the measured peak exceed this "
                     "prediction (SmolLM2 QLoRA: 1.33x); +run.env.MALLOC_MMAP_THRESHOLD_=131072 trades speed for it")
    mapped_load, mapped = _checkpoint_file_pages(shape, x, w)
    return ProcessBytes(runtime=cpu_runtime_bytes(x.sharding.engine, x.method), mapped_load=mapped_load,
                        mapped=mapped)


def train_components(shape: ModelShape, x: MemoryInputs, w: Weights, state: EngineState,
                     proc: ProcessBytes) -> dict[str, int]:
    """The training step's peak by component."""
    acts = activation_bytes(shape, method=x.method, micro_batch_size=x.micro_batch_size, seq_len=x.seq_len,
                            act_bytes=x.act_bytes, packing=x.packing, gradient_checkpointing=x.gradient_checkpointing,
                            lora_r=x.lora_r, lora_dropout=x.lora_dropout, target_modules=x.target_modules,
                            loss_chunk_tokens=x.loss_chunk_tokens)
    # bf16 autocast keeps a bf16 copy of every fp32 weight it casts (DDP full fine-tuning) until the forward and
    # backward are done: a weights term, not activations
    autocast_copies = w.total * 2 if x.sharding.engine == "ddp" and x.method == "full" and x.act_bytes == 2 else 0
    # the optimizer step's temporaries come after backward has freed the activations: they add only what exceeds them
    return {"weights": w.weights, "lora": w.lora_held, "autocast_cache": autocast_copies,
            "gradients": state.gradients, "optimizer": state.optimizer, "sharding_buffers": state.buffers,
            "activations": acts, "optimizer_step": max(0, state.step - acts), "runtime": proc.runtime,
            "checkpoint_file": proc.mapped}


def steady_bytes(x: MemoryInputs, w: Weights, state: EngineState, proc: ProcessBytes) -> int:
    """What stays allocated between training steps (the base of the eval, save and export phases)."""
    steady = w.weights + w.lora_held + state.optimizer + proc.runtime + proc.mapped
    if x.sharding.engine == "ddp":
        steady += state.gradients  # the gradients are views into DDP's buckets, which persist between steps
    if x.sharding.engine == "deepspeed":
        steady += state.gradients + state.buffers  # ZeRO's gradient partitions and buckets persist between steps
    return steady


def load_device_bytes(x: MemoryInputs, w: Weights) -> int:
    """The whole model as `load_model` materialises it on a device (QLoRA quantises while loading)."""
    if x.method == "qlora":
        return int(w.quantized * qlora_bytes_per_param(x.double_quant) + (w.total - w.quantized) * x.act_bytes)
    return w.total * x.load_bytes


def load_phase(shape: ModelShape, x: MemoryInputs, w: Weights, *, host_offloaded: int, runtime: int,
               mapped_load: int, notes: list[str]) -> tuple[dict[str, dict[str, int]], int]:
    """Peaks per worker while loading (`load`: Strategy.load_model and the method) and, where it adds something,
    while the strategy wraps the model (`prepare`, before any optimizer state exists), and the host RAM a node needs
    for both. Every worker materialises the whole model on its device before the strategy shards it — on a GPU
    tensor by tensor (distft.model.load_model's device_map; QLoRA quantises each tensor there), on CPU in host
    memory — unless the sharded load is streamed. Measured on CPU against a 3.4B model (bench/bench_scale.py,
    docs/benchmarks.md "Loading at scale")."""
    load_device = load_device_bytes(x, w)
    load = load_device + runtime + mapped_load
    offloading = x.sharding.offload_params or x.sharding.offload_optimizer
    if x.accelerator == "cpu":
        host_per_node = x.gpus_per_node * load  # CPU workers: the model lives in host memory
    else:
        per_worker_host = load_device  # ZeRO-3's zero.Init load (strategy.rank0_load=false) reads whole models
        if x.method == "qlora" or not (x.sharding.engine == "deepspeed" and x.sharding.zero_stage == 3):
            # distft.model.load_model: device_map puts each tensor on the GPU as it is read (and bitsandbytes
            # quantises it there): the host holds the tensors in flight, not the model
            per_worker_host = device_map_in_flight(shape, x)
            notes.append(f"load: each worker reads the checkpoint tensor by tensor onto its GPU (device_map), "
                         f"{per_worker_host / GiB:.2f} GiB of host RAM in flight at most; the checkpoint's pages "
                         f"({w.total * shape.checkpoint_bytes / GiB:.0f} GiB) are mapped as page cache, shared by "
                         "the node's workers and reclaimable, and not counted")
        host_per_node = x.gpus_per_node * per_worker_host + (x.gpus_per_node * host_offloaded if offloading else 0)
    if x.sharding.shards_parameters and x.rank0_load:
        # distft.strategy.streaming: every rank builds the model without weights; rank 0 reads the checkpoint one
        # decoder layer (or one root tensor) at a time, cast to the load dtype, and every rank receives the group
        # whole before keeping its shard (FSDP: torch's broadcast into the shards, in prepare; ZeRO-3: DeepSpeed's
        # parameter conversion, in load_model). No rank ever holds the whole model.
        group = max(shape.layer_params(), shape.embedding_params()) * x.load_bytes
        other = w.weights + w.lora_held + group + runtime
        if x.accelerator == "cpu":
            host_per_node = x.gpus_per_node * other + group  # rank 0 also holds the group it read
        else:
            host_per_node = group + (x.gpus_per_node * host_offloaded if offloading else 0)
        notes.append(f"load: streamed — rank 0 reads one layer group at a time ({group / GiB:.2f} GiB) into host "
                     "memory and every rank keeps its shard of it (strategy.rank0_load; a checkpoint without "
                     "safetensors weights is read whole by rank 0 instead)")
        filled = {"rank0": other + (group if x.accelerator == "cpu" else 0), "other": other}
        if x.sharding.engine == "fsdp":  # load_model builds an empty model; the weights arrive after fully_shard
            return {"load": _every_rank(runtime + w.lora_held), "prepare": filled}, host_per_node
        return {"load": filled}, host_per_node
    if x.sharding.shards_parameters:
        notes.append(f"load: each worker holds the full model ({load_device / GiB:.1f} GiB) on its device before "
                     "sharding (distft.model.load_model), so the model must fit one device at load")
    phases = {"load": _every_rank(load)}
    if x.sharding.engine == "ddp" and x.world > 1:
        sync = 2 * min(DDP_SYNC_BUCKET, w.module_bytes)
        phases["prepare"] = _every_rank(load + sync)
        if x.accelerator == "cpu":
            host_per_node += x.gpus_per_node * sync
    return phases, host_per_node


def device_map_in_flight(shape: ModelShape, x: MemoryInputs) -> int:
    """Host memory a worker holds while transformers loads a checkpoint onto its GPU with a device_map: the
    checkpoint's tensors are read one by one (under on-the-fly quantisation) or by DEVICE_MAP_READERS threads, each
    freed once it is on the device. A tensor read in the file's dtype is a view of the mapped file; one cast to
    another dtype on its way is first copied on the host (torch casts before it copies to the device)."""
    largest = max(shape.embedding_params(), max(i * o for _, i, o in shape.linears()))
    largest *= max(shape.checkpoint_bytes, x.load_bytes)
    return largest * (QLORA_IN_FLIGHT if x.method == "qlora" else DEVICE_MAP_READERS)


def eval_peak(shape: ModelShape, x: MemoryInputs, w: Weights, *, steady: int, notes: list[str]) -> int:
    """Evaluation: the eval-loss forward, or generation (KV cache, prefill, and under sharding the weights every
    rank gathers: the full model for the duration, or one layer at a time with eval.gather=layerwise — see the
    strategies' generation_context), whichever is larger."""
    pb, prompt = x.act_bytes, min(PROMPT_TOKENS, x.seq_len)
    kv = 2 * shape.layers * shape.kv_dim * pb * x.eval_batch_size * (prompt + x.max_new_tokens)
    gathered = max(w.module_bytes - (w.weights + w.lora_held), 0) if x.sharding.shards_parameters else 0
    if gathered and generates_layerwise(x, w, steady=steady):
        gathered = w.module_bytes // shape.layers  # one decoder layer (with its share of the embeddings) at a time
        notes.append(f"generation: eval.gather={x.eval_gather} — the model stays sharded and each forward gathers "
                     f"one layer ({gathered / GiB:.2f} GiB); the ranks decode in step")
    prefill = x.eval_batch_size * prompt * (2 * shape.intermediate + 4 * shape.hidden) * pb
    eval_loss = x.micro_batch_size * x.seq_len * shape.vocab * (pb + 8)
    notes.append(f"generation: KV cache {kv / GiB:.2f} GiB for eval.batch_size={x.eval_batch_size} x "
                 f"({prompt} prompt + {x.max_new_tokens} new tokens)"
                 + (f"; gathered weights {gathered / GiB:.2f} GiB" if gathered else ""))
    return steady + max(gathered + kv + prefill + x.eval_batch_size * shape.vocab * 8, eval_loss)


def generates_layerwise(x: MemoryInputs, w: Weights, *, steady: int) -> bool:
    """eval.gather as a sharded run resolves it: auto goes layer by layer on a GPU where the full weights would
    take more than settings.GATHER_SHARE of what training leaves free (the worker's rule, distft.eval.evaluate)."""
    if x.eval_gather != "auto":
        return x.eval_gather == "layerwise"
    return x.accelerator == "cuda" and x.device_bytes is not None and w.module_bytes > settings.GATHER_SHARE * (x.device_bytes - steady)


def save_and_export_phases(shape: ModelShape, x: MemoryInputs, w: Weights, *, steady: int, load_device: int,
                           notes: list[str]) -> dict:
    """Checkpoint save: DDP's rank 0 writes the trainable weights with safetensors, which first serialises them
    into one bytes object (a full copy); ZeRO and DCP write each rank's shards from the tensors themselves.
    Export (distft.export_shards): every rank gathers one tensor at a time (ZeRO-3: settings.EXPORT_GATHER_NUMEL
    elements at a time) and rank 0 writes it into its place in the sharded safetensors files, so a rank holds its
    training state plus what is gathered (the largest tensor at most fp32) and rank 0 a CPU copy; then the check:
    reloading the export on rank 0's device (logits), or reading the written tensors back one at a time (tensors;
    auto chooses it when a reload would take more than half of what training leaves free on the device)."""
    save_extra = w.trainable * 4 if x.sharding.engine == "ddp" else 0
    phases = {"save": {"rank0": steady + save_extra, "other": steady}}
    if x.export:
        if x.method == "full":
            tensor = shape.vocab * shape.hidden * 4
        else:
            tensor = x.lora_r * max(shape.hidden, shape.intermediate) * 4
        reload = export_check_reloads(x, load_device=load_device, steady=steady)
        if not reload:
            notes.append(f"export: run.export_check={x.export_check} — the written tensors are read back one at a "
                         f"time instead of reloading the model ({load_device / GiB:.1f} GiB) on rank 0")
        gathered = tensor
        if x.sharding.engine == "deepspeed" and x.sharding.zero_stage == 3:  # every rank gathers a chunk at a time
            exported, per_param = (w.total, w.per_param) if x.method == "full" else (w.lora, 4)  # adapters: fp32
            largest = tensor // 4  # elements of the largest exported tensor (`tensor` is its fp32 bytes)
            gathered = int(min(exported, max(settings.EXPORT_GATHER_NUMEL, largest)) * per_param)
        rank0 = steady + gathered + tensor + (load_device if reload else tensor)
        phases["export"] = {"rank0": rank0, "other": steady + gathered}
    return phases


def export_check_reloads(x: MemoryInputs, *, load_device: int, steady: int) -> bool:
    """Whether the export check reloads the model on rank 0 (run.export_check resolved as the worker does)."""
    if x.export_check != "auto":
        return x.export_check == "logits"
    if x.accelerator != "cuda" or x.device_bytes is None:
        return True  # on CPU the worker decides from the free host memory it sees
    return load_device <= settings.RELOAD_SHARE * (x.device_bytes - steady)


def _every_rank(peak: int) -> dict[str, int]:
    return {"rank0": peak, "other": peak}


def _dtype_bytes(name: str) -> int:
    return DTYPE_BYTES.get(name, 4)


def _deepspeed_bf16(x: MemoryInputs) -> bool:
    return x.sharding.engine == "deepspeed" and x.act_bytes == 2  # the bf16 engine casts the whole module


def activation_bytes(shape: ModelShape, *, method: str, micro_batch_size: int, seq_len: int, act_bytes: int,
                     packing: bool, gradient_checkpointing: bool, lora_r: int, lora_dropout: float,
                     target_modules, loss_chunk_tokens: int | None = None) -> int:
    """Bytes alive at the end of the forward pass of one micro-batch (saved for backward) plus the LM head's
    transient logits, log-softmax and their gradients.

    Per token and decoder layer, transformers' LlamaDecoderLayer with sdpa saves 8d + 2·kv + 4·ff elements when
    its weights train (the two RMSNorms 3d each counted as 2d + the normalised output, q/k/v/o inputs and outputs,
    the SwiGLU's gate, up, SiLU and product); with frozen weights the norms keep 2d less. LoRA adds the r-sized
    A outputs and, with dropout, each targeted layer's dropped-out input and its mask.
    """
    d, kv, ff, L = shape.hidden, shape.kv_dim, shape.intermediate, shape.layers
    tokens = micro_batch_size * seq_len
    if method == "full":
        per_token = (8 * d + 2 * kv + 4 * ff) * act_bytes
    else:
        targets = shape.layer_lora_targets(list(target_modules))
        per_token = (6 * d + 2 * kv + 4 * ff + lora_r * len(targets)) * act_bytes
        if lora_dropout > 0:
            per_token += int(sum(i for i, _ in targets) * (act_bytes + DROPOUT_MASK_BYTES))
    mask = MASK_BYTES_PER_POSITION_PAIR * micro_batch_size * seq_len**2 if packing else 0
    layer = tokens * per_token + mask
    if loss_chunk_tokens:  # the logits and their gradient whole; the fp32 loss temporaries of one chunk
        head = tokens * shape.vocab * 2 * act_bytes + min(loss_chunk_tokens, tokens) * shape.vocab * HEAD_EXTRA_BYTES
    else:
        head = tokens * shape.vocab * (act_bytes + HEAD_EXTRA_BYTES)
    if gradient_checkpointing:
        # only each layer's input is kept; one layer's activations are recomputed at a time during backward
        return L * tokens * d * act_bytes + layer + head
    return L * layer + head


def _checkpoint_file_pages(shape: ModelShape, x: MemoryInputs, w: Weights) -> tuple[int, int]:
    """CPU: pages of the weights file in a worker's resident memory beyond the tensors already counted, at load and
    afterwards. from_pretrained memory-maps the safetensors file; tensors kept in the file's dtype are views into it
    (zero copy), so every page read while loading (all of them: QLoRA quantises every linear, a dtype change copies
    every tensor) stays resident — as clean, reclaimable page cache, which RSS counts — for as long as one view
    lives. DDP keeps the views; FSDP and ZeRO-3 replace every parameter by a copy of its shard and drop them.
    Seen in /proc/self/smaps of a QLoRA worker (docs/benchmarks.md)."""
    file_bytes = w.total * shape.checkpoint_bytes
    kept = (w.total - w.quantized) * x.load_bytes  # parameters loaded unquantised (all but QLoRA's 4-bit linears)
    views = kept if x.load_bytes == shape.checkpoint_bytes else 0
    extra = file_bytes - views
    return extra, extra if views and x.sharding.engine == "ddp" else 0


def cpu_runtime_bytes(family: str, method: str) -> int:
    b = CPU_RUNTIME_BYTES
    return b["base"] + b["transformers"] + (b["deepspeed"] if family == "deepspeed" else 0)


def _zero3_persistent_bytes(shape: ModelShape, method: str, lora_r: int, target_modules, zc: dict,
                            per_param: float) -> int:
    """ZeRO-3 keeps parameters with at most stage3_param_persistence_threshold elements whole on every rank."""
    threshold = zc["stage3_param_persistence_threshold"]
    sizes = [shape.hidden] * (2 * shape.layers + 1)  # RMSNorm weights
    if method != "full":
        for i, o in shape.lora_targets(list(target_modules)):
            sizes += [lora_r * i, lora_r * o]
    else:
        sizes += [i * o for _, i, o in shape.linears()] * shape.layers
    return int(sum(s for s in sizes if s <= threshold) * per_param)
