"""Per-worker memory of a fine-tuning run, by component and by phase (load, train, eval/generation, checkpoint save,
export), from the model's shape and the run's settings. Every formula follows what distft's code path does (the
docstrings say which line of which library); docs/planner.md derives them and bench/bench_plan.py checks them.
"""

from dataclasses import dataclass, field

from distft.plan.shapes import ModelShape

GiB = 2**30

# DeepSpeed ZeRO defaults (deepspeed.runtime.zero.config.DeepSpeedZeroConfig; pinned by a unit test) for the keys
# distft's generated config leaves unset.
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                 "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                 "stage3_param_persistence_threshold": 100_000}
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
    node needs while its workers load the model."""

    train: dict[str, int]
    phases: dict[str, dict[str, int]]
    host_per_node_load: int
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


def estimate_memory(shape: ModelShape, *, method: str, strategy: str, world: int, precision: str,
                    micro_batch_size: int, seq_len: int, packing: bool = True, gradient_checkpointing: bool = False,
                    zero_stage: int = 0, offload_optimizer: bool = False, offload_params: bool = False,
                    cpu_offload: bool = False, zero_config: dict | None = None, lora_r: int = 16,
                    lora_dropout: float = 0.05, target_modules=("all-linear",), double_quant: bool = True,
                    accelerator: str = "cuda", eval_enabled: bool = True, eval_batch_size: int = 16,
                    max_new_tokens: int = 256, export: bool = True, gpus_per_node: int = 8,
                    rank0_load: bool = False, cpu_malloc_pinned: bool = True) -> MemoryPlan:
    family = "deepspeed" if strategy.startswith("zero") else "fsdp" if strategy.startswith("fsdp") else "ddp"
    zc = {**ZERO_DEFAULTS, **(zero_config or {})}
    pb = 2 if precision in ("bf16", "fp16") else 4  # compute dtype bytes
    n_total = shape.total_params()
    lora = shape.lora_params(lora_r, list(target_modules)) if method != "full" else 0
    quant = shape.quantized_params() if method == "qlora" else 0
    qb = qlora_bytes_per_param(double_quant)
    trainable = n_total if method == "full" else lora
    ds_bf16 = family == "deepspeed" and pb == 2  # the DeepSpeed bf16 engine casts the whole module to bf16
    notes: list[str] = []

    # --- weights as held by the module (before sharding) ------------------------------------------------------
    # full: fp32 master weights (distft.recipe.load_dtype); LoRA: frozen base in the compute dtype, adapters fp32
    # (peft's autocast_adapter_dtype); QLoRA: NF4 linears, and the rest upcast to fp32 by
    # prepare_model_for_kbit_training.
    if method == "full":
        base_bytes, adapter_bytes = n_total * (2 if ds_bf16 else 4), 0
    elif method == "lora":
        base_bytes, adapter_bytes = n_total * pb, lora * (2 if ds_bf16 else 4)
    else:
        base_bytes = int(quant * qb) + (n_total - quant) * (2 if ds_bf16 else 4)
        adapter_bytes = lora * (2 if ds_bf16 else 4)
    module_bytes = base_bytes + adapter_bytes
    per_param = module_bytes / max(n_total + lora, 1)
    shard = family == "fsdp" or (family == "deepspeed" and zero_stage == 3)
    persistent = _zero3_persistent_bytes(shape, method, lora_r, target_modules, zc, per_param) \
        if family == "deepspeed" and zero_stage == 3 else 0

    weights = base_bytes // world + persistent if shard else base_bytes
    lora_w = adapter_bytes // world if shard and family == "fsdp" else adapter_bytes if not shard else 0
    if family == "deepspeed" and zero_stage == 3:
        weights = (module_bytes - persistent) // world + persistent
        lora_w = 0  # counted in weights (ZeRO-3 partitions adapters and base alike)
    host_offloaded = 0
    if (family == "deepspeed" and offload_params) or (family == "fsdp" and cpu_offload):
        host_offloaded += weights + lora_w
        weights, lora_w = persistent, 0

    # --- gradients, optimizer states, sharding buffers --------------------------------------------------------
    grad_bytes = 2 if ds_bf16 else 4
    buffers = 0
    if family == "ddp":
        grads = trainable * 4
        optimizer = trainable * 8  # AdamW exp_avg + exp_avg_sq
        buffers = trainable * 4  # DistributedDataParallel's flat gradient buckets (a second copy of the grads)
    elif family == "fsdp":
        grads = trainable * 4 // world  # sharded fp32 gradients (reduce dtype fp32)
        optimizer = trainable * 8 // world
        layer = shape.layer_params()
        gathered_dtype = pb if method != "qlora" else per_param
        # one layer gathered + the next one prefetched; the root (embeddings, norm, LM head) stays gathered;
        # the layer's unsharded gradients before reduce-scatter
        layer_trainable = layer if method == "full" else lora // max(shape.layers, 1)
        buffers = int(2 * layer * gathered_dtype + shape.root_params() * (pb if method == "full" else per_param)
                      + layer_trainable * 4)
        notes.append(f"FSDP: all-gather of one decoder layer {layer * gathered_dtype / GiB:.3f} GiB (x2 with the "
                     f"prefetched next layer); the root (embeddings, norm, LM head) stays gathered: "
                     f"{shape.root_params() * (pb if method == 'full' else per_param) / GiB:.3f} GiB")
        if cpu_offload:
            host_offloaded += grads + optimizer
            grads = optimizer = 0
    else:
        # ZeRO: fp32 master copy + Adam moments partitioned (12 bytes/param / N, ZeRO paper), kept even in fp32
        # training (DeepSpeed clones the fp32 partition)
        optimizer = trainable * 12 // world
        # The gradient bucket is allocated at its full configured size whatever the model's size
        # (stage3.py: `torch.empty(self.reduce_bucket_size, ...)`; stage_1_and_2.py setup_buckets, two with
        # overlap_comm): 2 GB in fp32 at the default 5e8 elements, even for a LoRA run.
        n_buckets = 2 if zero_stage < 3 and zc.get("overlap_comm", False) else 1
        reduce_bucket = zc["reduce_bucket_size"] * grad_bytes * n_buckets
        if zero_stage == 1:
            grads = trainable * grad_bytes
        elif zero_stage == 2:
            grads = trainable * 4 // world
        else:  # partitioned gradients in the module dtype (the fp32 copy for the step is made per sub-group,
            # after the activations are gone)
            grads = trainable * grad_bytes // world
        buffers = reduce_bucket
        notes.append(f"DeepSpeed: reduce_bucket_size {zc['reduce_bucket_size']:.3g} elements, allocated whole: "
                     f"{reduce_bucket / GiB:.2f} GiB (strategy.deepspeed={{zero_optimization:{{reduce_bucket_size:N}}}} "
                     "to shrink it)")
        if zero_stage == 3:
            biggest = max(shape.layer_params(), shape.embedding_params())
            live = min(zc["stage3_max_live_parameters"], 2 * biggest, biggest + zc["stage3_prefetch_bucket_size"])
            buffers += int(live * per_param)  # gathered layer(s) during forward/backward
            notes.append(f"ZeRO-3: gathered working set {live * per_param / GiB:.3f} GiB (prefetch bucket "
                         f"{zc['stage3_prefetch_bucket_size']:.3g}, max live {zc['stage3_max_live_parameters']:.3g} "
                         f"elements); persistent (unpartitioned) parameters {persistent / GiB:.3f} GiB")
        if offload_optimizer:
            host_offloaded += optimizer + trainable * 4 // world
            optimizer = 0
            grads = 0 if zero_stage >= 2 else grads

    # --- activations ------------------------------------------------------------------------------------------
    acts = activation_bytes(shape, method=method, micro_batch_size=micro_batch_size, seq_len=seq_len,
                            act_bytes=pb, packing=packing, gradient_checkpointing=gradient_checkpointing,
                            lora_r=lora_r, lora_dropout=lora_dropout, target_modules=target_modules)
    autocast_copies = n_total * 2 if family == "ddp" and method == "full" and pb == 2 else 0  # bf16 weight cache

    runtime = cpu_runtime_bytes(family, method) if accelerator == "cpu" else 0
    mapped_load, mapped = _checkpoint_file_pages(shape, method, family, pb, quant) if accelerator == "cpu" else (0, 0)
    if accelerator == "cpu" and not cpu_malloc_pinned:
        # glibc raises its mmap threshold after the first large free, and freed heap memory then stays resident:
        # peak RSS exceeds peak live bytes by an amount that depends on allocation order (docs/benchmarks.md)
        notes.append("CPU: run.env.MALLOC_MMAP_THRESHOLD_ is not set (hardware=cpu sets it), so glibc keeps freed "
                     "memory resident: SmolLM2 QLoRA measured 1.33x its prediction without it (docs/benchmarks.md)")
    train = {"weights": weights, "lora": lora_w, "gradients": grads, "optimizer": optimizer,
             "sharding_buffers": buffers, "activations": acts + autocast_copies, "runtime": runtime,
             "checkpoint_file": mapped}
    steady = weights + lora_w + optimizer + runtime + mapped + (buffers if family == "ddp" else 0)
    if family == "deepspeed":
        steady += grads + buffers  # ZeRO's gradient partitions and buckets persist between steps
    train_peak = sum(train.values())

    # --- load: every worker materialises the whole model on its device before the strategy shards it ---------
    # (distft.model.load_model: from_pretrained, then .to(device); QLoRA quantises while loading with device_map)
    load_dtype_bytes = 4 if method == "full" else pb
    load_device = int(quant * qb + (n_total - quant) * pb) if method == "qlora" else n_total * load_dtype_bytes
    load = load_device + runtime + mapped_load
    if accelerator == "cpu":
        host_per_node = gpus_per_node * load  # CPU workers: the model lives in host memory
    else:
        # from_pretrained builds the model in host RAM, then .to(device); QLoRA streams tensors to the GPU
        per_worker_host = min(load_device, 10 * 10**9) if method == "qlora" else load_device
        host_per_node = gpus_per_node * per_worker_host
        if offload_params or cpu_offload or offload_optimizer:
            host_per_node += gpus_per_node * host_offloaded
    load_phase = {"rank0": load, "other": load}
    if shard and rank0_load:
        # strategy.rank0_load: rank 0 reads the weights into host memory, the other ranks start from meta tensors
        # and receive only their shards (FSDP: broadcast one tensor at a time; ZeRO-3: zero.Init partitions each
        # layer as it is built), so a device holds its shard plus about one full tensor (the embedding) in flight.
        in_flight = shape.vocab * shape.hidden * load_dtype_bytes
        other = weights + lora_w + in_flight + runtime
        load_phase = {"rank0": load if accelerator == "cpu" else other, "other": other}
        if accelerator == "cpu":
            host_per_node = load + (gpus_per_node - 1) * other
        else:
            host_per_node = load_device + (gpus_per_node * host_offloaded
                                           if offload_params or cpu_offload or offload_optimizer else 0)
        notes.append(f"load: rank 0 reads the model ({load_device / GiB:.1f} GiB) into host memory; the other ranks "
                     "start from empty tensors and receive their shards (strategy.rank0_load)")
    elif shard:
        notes.append(f"load: each worker holds the full model ({load_device / GiB:.1f} GiB) on its device before "
                     "sharding (distft.model.load_model), so the model must fit one device at load")

    # --- eval / generation ------------------------------------------------------------------------------------
    phases = {"load": load_phase, "train": {"rank0": train_peak, "other": train_peak}}
    if eval_enabled:
        kv = 2 * shape.layers * shape.kv_dim * pb * eval_batch_size * (min(PROMPT_TOKENS, seq_len) + max_new_tokens)
        gathered = 0
        if shard:  # generation_context: every rank gathers the full weights for the duration
            gathered = max(module_bytes - (weights + lora_w), 0)
        prefill = eval_batch_size * min(PROMPT_TOKENS, seq_len) * (2 * shape.intermediate + 4 * shape.hidden) * pb
        eval_loss = micro_batch_size * seq_len * shape.vocab * (pb + 8)
        eval_peak = steady + max(gathered + kv + prefill + eval_batch_size * shape.vocab * 8, eval_loss)
        notes.append(f"generation: KV cache {kv / GiB:.2f} GiB for eval.batch_size={eval_batch_size} x "
                     f"({min(PROMPT_TOKENS, seq_len)} prompt + {max_new_tokens} new tokens)"
                     + (f"; gathered full weights {gathered / GiB:.2f} GiB" if gathered else ""))
        phases["eval"] = {"rank0": eval_peak, "other": eval_peak}

    # --- checkpoint save: DDP's rank 0 writes the trainable weights with safetensors, which first serialises them
    # into one bytes object (a full copy); ZeRO and DCP write each rank's shards from the tensors themselves
    save_extra = trainable * 4 if family == "ddp" else 0
    phases["save"] = {"rank0": steady + save_extra, "other": steady}
    if export:
        # rank 0 gathers the full (trainable) state into host memory, writes it, then reloads the export on its
        # device to check the logits (distft.export.verify_export)
        state = n_total * 4 if method == "full" else lora * 4
        reload = load_device
        export_device = steady + reload + (state if accelerator == "cpu" else 0)
        phases["export"] = {"rank0": export_device, "other": steady}
    return MemoryPlan(train=train, phases=phases, host_per_node_load=host_per_node, notes=notes,
                      total_params=n_total, trainable_params=trainable, lora_params=lora)


def activation_bytes(shape: ModelShape, *, method: str, micro_batch_size: int, seq_len: int, act_bytes: int,
                     packing: bool, gradient_checkpointing: bool, lora_r: int, lora_dropout: float,
                     target_modules) -> int:
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
    head = tokens * shape.vocab * (act_bytes + HEAD_EXTRA_BYTES)
    if gradient_checkpointing:
        # only each layer's input is kept; one layer's activations are recomputed at a time during backward
        return L * tokens * d * act_bytes + layer + head
    return L * layer + head


def _checkpoint_file_pages(shape: ModelShape, method: str, family: str, pb: int, quant: int) -> tuple[int, int]:
    """CPU: pages of the weights file in a worker's resident memory beyond the tensors already counted, at load and
    afterwards. from_pretrained memory-maps the safetensors file; tensors kept in the file's dtype are views into it
    (zero copy), so every page read while loading (all of them: QLoRA quantises every linear, a dtype change copies
    every tensor) stays resident — as clean, reclaimable page cache, which RSS counts — for as long as one view
    lives. DDP keeps the views; FSDP and ZeRO-3 replace every parameter by a copy of its shard and drop them.
    Seen in /proc/self/smaps of a QLoRA worker (docs/benchmarks.md)."""
    n = shape.total_params()
    file_bytes = n * shape.checkpoint_bytes
    load_bytes = 4 if method == "full" else pb  # distft.recipe.load_dtype
    kept = (n - quant) * load_bytes  # parameters loaded unquantised (all but QLoRA's 4-bit linears)
    views = kept if load_bytes == shape.checkpoint_bytes else 0
    extra = file_bytes - views
    return extra, extra if views and family == "ddp" else 0


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
