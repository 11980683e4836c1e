"""Streaming rank-0 load for FSDP and ZeRO-3: no rank ever holds the whole model.

Every rank (rank 0 too) builds the model without weights (`load_model(empty=True)`: parameters on the meta device,
buffers computed), and the method is applied to it; after `fully_shard` each rank allocates only its shards, and rank
0 reads the safetensors checkpoint lazily, one decoder layer at a time (the embeddings, final norm and LM head one
tensor at a time), broadcasting each group into everyone's shards and freeing it before reading the next. Host memory
at load is about one layer group on rank 0 plus each rank's own shards, instead of the whole model on rank 0.

The numbers are those of a normal load (tested bit for bit):
- between `load_model` and `prepare` every parameter is a zero-storage CPU stand-in of its shape and dtype (one
  element, expanded). peft initialises LoRA adapters on CPU and then moves them to the device of the base layer, so on
  a meta base they would be lost; on a stand-in they stay on CPU, drawn from the RNG exactly as on a loaded model.
  Nothing may compute with the stand-ins: setups that read the base weights (DoRA, PiSSA-style inits, copies of base
  modules) are refused in `detach`.
- `detach` (before `fully_shard`) turns the stand-ins back into meta parameters and keeps the tensors that are real:
  the adapters (identical on every rank, since every rank seeds the same) and the buffers.
- `fill` (after `fully_shard` and `to_empty`) restores the buffers, sends rank 0's adapters (as when rank 0 loaded
  the model) and then the checkpoint, group by group, with torch's `set_model_state_dict(..., full_state_dict=True,
  broadcast_from_rank0=True, strict=False)` on each partial state dict. Each checkpoint tensor is cast to its
  parameter's dtype as `from_pretrained` would.
Checkpoint keys are matched to parameters through the parameter objects, which peft keeps while it renames their
paths (`x.weight` becomes `base_model.model.x.base_layer.weight`); a tied LM head is the embedding's parameter and is
sent once. Checkpoints that `from_pretrained` would have to convert (no safetensors, renamed or fused keys, shape
mismatches) are not streamed: `open_checkpoint` says why and FSDP falls back to loading the whole model on rank 0.

ZeRO-3 (`fill_zero3`) needs no stand-ins: its load returns the model already partitioned, as transformers' zero.Init
load does, and the method is applied afterwards. Each layer group is allocated whole on every rank, filled on rank 0,
and handed to DeepSpeed's own parameter conversion, which broadcasts it from rank 0 and keeps each rank's partition.
"""

import ctypes
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from distft.errors import UserError
from distft.export_shards import open_safetensors

log = logging.getLogger(__name__)

MiB = 2**20
# peft's LoRA initialisations that draw from the RNG without looking at the base weights
_WEIGHT_FREE_INITS = (True, False, "gaussian")


class SafetensorsCheckpoint:
    """Rank 0's lazy view of a safetensors checkpoint: the headers are read up front, each tensor only when asked."""

    def __init__(self, files: list[str]):
        self._handles = {path: open_safetensors(path) for path in files}
        self.shapes: dict[str, tuple[int, ...]] = {}  # checkpoint key -> shape
        self._file_of: dict[str, str] = {}
        for path, handle in self._handles.items():
            for key in handle.keys():
                self._file_of.setdefault(key, path)
                self.shapes.setdefault(key, tuple(handle.get_slice(key).get_shape()))

    @property
    def files(self) -> list[str]:
        return list(self._handles)

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, cast to `dtype` (the copy as read is freed at once when a cast was needed)."""
        return self._handles[self._file_of[key]].get_tensor(key).to(dtype)

    def close(self) -> None:
        self._handles.clear()


def open_checkpoint(model: torch.nn.Module, rank: int) -> tuple[SafetensorsCheckpoint | None, str | None]:
    """Rank 0 opens the checkpoint of an empty `model` (`load_model(empty=True)`) and checks that it fills every
    parameter as it is; every rank gets rank 0's answer. Returns (the checkpoint on rank 0 / None elsewhere, None) or
    (None, why it cannot be streamed). Collective where there are several ranks."""
    checkpoint, problem = None, None
    if rank == 0:
        try:
            checkpoint, problem = open_local_checkpoint(model)
        except Exception as e:  # any failure is a reason to fall back: the other ranks wait for the answer below
            problem = f"its checkpoint could not be read ({type(e).__name__}: {e})"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        answer = [problem]
        dist.broadcast_object_list(answer, src=0)
        problem = answer[0]
    if problem is not None and checkpoint is not None:
        checkpoint.close()
        checkpoint = None
    return checkpoint, problem


def open_local_checkpoint(model: torch.nn.Module) -> tuple[SafetensorsCheckpoint | None, str | None]:
    """`open_checkpoint` in this process alone, whatever the process group (not collective)."""
    source = getattr(model, "weight_source", None)
    if source is None:
        return None, "the model records no weight source (it was not built by distft.model.load_model(empty=True))"
    if converted := _converted_keys(model):
        return None, f"transformers converts {converted}'s checkpoint keys while loading"
    files = source.safetensors_files()
    if not files:
        return None, (f"{source.model_dir} has no safetensors weights (model.safetensors or model.safetensors.index.json;"
                      " to stream a .bin checkpoint, load it once and `save_pretrained` it to a new directory: "
                      "transformers writes safetensors)")
    checkpoint = SafetensorsCheckpoint(files)
    missing, mismatched = [], []
    for tensor, names in tensor_names(model).values():
        key = next((n for n in names if n in checkpoint.shapes), None)
        if key is None:
            if isinstance(tensor, torch.nn.Parameter):  # a persistent buffer may be absent: its computed value stays
                missing.append(names[0])
        elif checkpoint.shapes[key] != tuple(tensor.shape):
            mismatched.append(f"{key} {list(checkpoint.shapes[key])} (model: {list(tensor.shape)})")
    problems = [*([f"has no tensor for {_some(missing)}"] if missing else []),
                *([f"has other shapes: {_some(mismatched)}"] if mismatched else [])]
    if problems:  # from_pretrained would initialise or refuse these; loading whole on rank 0 does the same
        checkpoint.close()
        return None, "the checkpoint " + " and ".join(problems)
    return checkpoint, None


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _converted_keys(model: torch.nn.Module) -> str | None:
    """The model type whose checkpoint transformers renames or fuses while loading (e.g. MoE experts), or None."""
    if getattr(model, "_checkpoint_conversion_mapping", None):  # transformers 4.x
        return type(model).__name__
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    return type(model).__name__ if get_model_conversion_mapping(model, add_legacy=False) else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Transformer blocks, found by class name (`LlamaDecoderLayer`, `MistralDecoderLayer`, ...); peft wrappers
    leave them in place, so this works for LoRA/QLoRA models too."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def tensor_names(model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Every parameter and persistent buffer, by id, with all the state-dict names it has (a tied weight has
    several), in module order."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        tensors = [*module._parameters.items(),
                   *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set)]
        for name, tensor in tensors:
            if tensor is not None:
                found.setdefault(id(tensor), (tensor, []))[1].append(f"{prefix}.{name}" if prefix else name)
    return found


def _standin(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A CPU parameter of p's shape and dtype that holds one element (no memory for the weights)."""
    return torch.nn.Parameter(torch.empty((), dtype=p.dtype).expand(p.shape), requires_grad=p.requires_grad)


class StreamingLoad:
    """One model's streaming load, from `FSDPStrategy.load_model` to the end of its `prepare` (see the module
    docstring for the three steps)."""

    def __init__(self, model: torch.nn.Module, checkpoint: SafetensorsCheckpoint | None):
        """Give every meta parameter of the empty `model` a stand-in and remember the checkpoint names that fill it.
        `checkpoint`: rank 0's (from `open_checkpoint`), None on the other ranks."""
        self.checkpoint = checkpoint
        names = tensor_names(model)
        standins: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and p.is_meta:
                    if id(p) not in standins:  # a tied weight: one stand-in for all its uses
                        standins[id(p)] = _standin(p)
                    module._parameters[name] = standins[id(p)]
        # id -> (the stand-in, or a buffer; the checkpoint names that can fill it)
        self._names: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for old_id, (tensor, tensor_names_) in names.items():
            tensor = standins.get(old_id, tensor)
            self._names[id(tensor)] = (tensor, tensor_names_)
        self._small: dict[str, torch.Tensor] = {}  # set by detach: state-dict name -> real tensor (the adapters)
        self._buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self._groups: list[list[tuple[str, list[str], torch.dtype]]] = []

    def detach(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        """Before `fully_shard`: every parameter and buffer of `model` (the method applied) on the meta device, the
        real ones kept, and the checkpoint split into groups (one per decoder layer in `layers`; the others one
        tensor each). Raises UserError where the method's set-up must have read the base weights."""
        if why := adapter_problem(model):
            raise UserError(f"strategy=fsdp streams the base weights into the model after the method is applied, but "
                            f"{why}; set strategy.rank0_load=false (every rank loads the weights) for this setup")
        meta: dict[int, torch.Tensor] = {}
        sources: dict[str, tuple[list[str], torch.dtype]] = {}
        for prefix, module in model.named_modules():
            for name, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=p.requires_grad)
                    fqn = f"{prefix}.{name}" if prefix else name
                    if id(p) in self._names:
                        sources[fqn] = (self._names[id(p)][1], p.dtype)
                    elif p.is_meta:
                        raise RuntimeError(f"{fqn} is on the meta device but no checkpoint tensor fills it")
                    else:  # made after load_model: an adapter, the same on every rank
                        self._small[fqn] = p.detach()
                module._parameters[name] = meta[id(p)]
            for name, b in module._buffers.items():
                if b is None:
                    continue
                self._buffers.append((module, name, b))
                if id(b) in self._names and name not in module._non_persistent_buffers_set:
                    sources.setdefault(f"{prefix}.{name}" if prefix else name, (self._names[id(b)][1], b.dtype))
                module._buffers[name] = meta.setdefault(id(b), b.to("meta"))
        self._names.clear()  # the stand-ins are no longer needed
        layer_ids = {id(layer) for layer in layers}
        prefixes = [name + "." for name, m in model.named_modules() if id(m) in layer_ids]
        groups: dict[str, list[tuple[str, list[str], torch.dtype]]] = {}
        for fqn, (names, dtype) in sources.items():
            group = next((p for p in prefixes if fqn.startswith(p)), fqn)
            groups.setdefault(group, []).append((fqn, names, dtype))
        self._groups = list(groups.values())

    def fill(self, model: torch.nn.Module, *, rank: int, buffer_device: torch.device) -> None:
        """After `fully_shard` and `to_empty`: buffers, then rank 0's adapters, then the checkpoint group by group
        into every rank's shards; buffers end on `buffer_device`. Collective: every rank calls it."""
        restored: dict[int, torch.Tensor] = {}
        for module, name, b in self._buffers:
            device = module._buffers[name].device  # where to_empty put it: the parameters' device
            module._buffers[name] = restored.setdefault(id(b), b.to(device))
        if self._small:  # every rank knows the same names; rank 0's values win, as when it loaded the whole model
            _broadcast_into(model, dict(self._small) if rank == 0 else {})
        read = held = 0
        for group in self._groups:
            state = dict(self._read(group)) if rank == 0 else {}
            size = sum(t.numel() * t.element_size() for t in state.values())
            read, held = read + size, max(held, size)
            _broadcast_into(model, state)
            del state
        moved: dict[int, torch.Tensor] = {}
        for module, name, b in self._buffers:  # non-persistent buffers are in no state dict: rank 0's everywhere
            if id(b) not in moved:
                moved[id(b)] = restored[id(b)].to(buffer_device)
                if dist.get_world_size() > 1:
                    dist.broadcast(moved[id(b)], src=0)
            module._buffers[name] = moved[id(b)]
        if rank == 0:
            log.info("FSDP: streamed %.1f MiB from %d safetensors file(s) in %d groups, holding at most %.1f MiB at "
                     "once", read / MiB, len(self.checkpoint.files), len(self._groups), held / MiB)
            self.checkpoint.close()
        self._small, self._buffers, self._groups = {}, [], []

    def _read(self, group: list[tuple[str, list[str], torch.dtype]]) -> Iterator[tuple[str, torch.Tensor]]:
        for fqn, names, dtype in group:
            key = next((n for n in names if n in self.checkpoint.shapes), None)
            if key is not None:  # absent only for a persistent buffer (checked in open_checkpoint)
                yield fqn, self.checkpoint.read(key, dtype)


def _broadcast_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Send rank 0's full tensors in `state` (a part of the model's state dict; {} on the other ranks) into every
    rank's shards, one tensor at a time (torch.distributed.checkpoint's broadcast path)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


def adapter_problem(model: torch.nn.Module) -> str | None:
    """Why the adapters peft set up on stand-in base weights cannot be trusted (their set-up read the base weights or
    copied base modules), or None."""
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        kind = type(config).__name__
        init = getattr(config, "init_lora_weights", True)
        if kind != "LoraConfig":
            return f"the {kind} adapter '{name}' is not LoRA"
        if getattr(config, "use_dora", False):
            return f"DoRA (adapter '{name}') initialises its magnitudes from the base weights"
        if init not in _WEIGHT_FREE_INITS:
            return f"init_lora_weights={init!r} (adapter '{name}') initialises the adapters from the base weights"
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            return f"adapter '{name}' copies base modules (modules_to_save / trainable_token_indices)"
    if any(getattr(m, "lora_variant", None) for m in model.modules()):
        return "a LoRA variant initialises from the base weights"
    return None


# --- ZeRO-3 ---------------------------------------------------------------------------------------------------------

def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc's malloc_trim; a no-op elsewhere). After the first large
    free, glibc serves tensors of up to 32 MiB from the heap and keeps what they free: loading a 3.4B model into ZeRO-3
    partitions on CPU held well above the plan without this (docs/benchmarks.md, "Loading at scale")."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fill_zero3(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint | None, *, rank: int, ds_config: dict,
               device: torch.device, layers: list[torch.nn.Module]) -> None:
    """ZeRO-3's streaming load: turn an empty `model` (`load_model(empty=True)`) into DeepSpeed's partitioned
    parameters one group at a time (each decoder layer in `layers`; every other module's own parameters).

    Each group is allocated whole on every rank's device, rank 0 fills it from its lazy `checkpoint` (None on the other
    ranks), and DeepSpeed's own conversion (what `deepspeed.zero.Init` does to a parameter as it is created) broadcasts
    it from rank 0 and keeps each rank's partition. Memory at load: one layer group per rank plus the partitions, where
    transformers' zero.Init load has rank 0 read the whole state dict first. Parameters take zero.Init's dtype (bf16
    under a bf16 config, else the model's), cast from the checkpoint as `from_pretrained` does. Collective."""
    import deepspeed

    names = tensor_names(model)  # checkpoint names by parameter, taken before the parameters are replaced
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled"))
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    groups = [list(layer.modules()) for layer in layers]
    groups += [[m] for m in model.modules() if id(m) not in in_layers and any(
        p is not None for p in m._parameters.values())]
    # Buffers are computed (rotary inv_freq), identical on every rank, and never partitioned. Every module's: the
    # rotary embedding holds buffers and no parameters, and DeepSpeed moves no module of a zero.Init model to its device
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    converted: dict[int, torch.nn.Parameter] = {}  # id of the empty parameter -> its ZeRO-3 parameter (ties share)
    anchor = None
    read = held = 0
    for modules in groups:
        fresh: list[torch.nn.Parameter] = []
        for module in modules:
            for name, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) not in converted:
                    dtype = torch.bfloat16 if bf16 and p.is_floating_point() else p.dtype
                    new = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                             requires_grad=p.requires_grad)
                    if rank == 0:
                        key = next(n for n in names[id(p)][1] if n in checkpoint.shapes)  # checked in open_checkpoint
                        with torch.no_grad():
                            new.copy_(checkpoint.read(key, p.dtype))
                    converted[id(p)] = new
                    fresh.append(new)
                module._parameters[name] = converted[id(p)]
        size = sum(p.numel() * p.element_size() for p in fresh)
        read, held = read + size, max(held, size)
        if anchor is None:  # the first conversion sets DeepSpeed's partitioning up from the config
            holder = torch.nn.Module()
            for i, p in enumerate(fresh):
                holder.register_parameter(f"p{i}", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)
            anchor = fresh[0] if fresh else None
        elif fresh:
            anchor.convert_to_zero_parameters(param_list=fresh)  # broadcast from rank 0, then partitioned
        if device.type == "cpu":
            release_freed_memory()
    if rank == 0:
        log.info("ZeRO-3: streamed %.1f MiB from %d safetensors file(s) in %d groups, holding at most %.1f MiB at once",
                 read / MiB, len(checkpoint.files), len(groups), held / MiB)
        checkpoint.close()
