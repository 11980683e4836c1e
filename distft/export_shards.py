"""Hugging Face exports written one tensor at a time, so no process ever holds the whole model.

Every tensor's name, shape and dtype is known before any weight is gathered (from the model's parameters, sharded or
not), so the shard assignment is planned first with huggingface_hub's own splitter (the one `save_pretrained` uses):
the same file names (`model-0000k-of-0000n.safetensors`, or `model.safetensors` when one file holds everything) and
the same `model.safetensors.index.json`. Each shard file is laid out up front (its safetensors header lists every
tensor's offsets), and each tensor is written into its place as soon as it arrives, then freed. Files are written
under temporary names and renamed when complete; the index is written last.

A strategy (or the offline checkpoint converter) provides the tensors as an iterator of `(ExportTensor, tensor)`
pairs in plan order: collective gathers happen inside that iterator on every rank, and only rank 0 gets (and writes)
real tensors. The same iterator, run a second time, feeds `check_export_tensors`, which reads the written files back
lazily and compares them tensor by tensor: the check for models too big to reload whole.
"""

import copy
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

# transformers' `save_pretrained` default (huggingface_hub's own default is 5GB): the same shards as before
DEFAULT_MAX_SHARD_SIZE = "50GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # peft loads exactly this one file (adapters are never sharded)
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_PARTIAL = ".partial"  # suffix of a file still being written
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class ExportTensor:
    """One tensor of an export: its name in the files, the model's name(s) for it and what gets written."""

    name: str  # key in the exported safetensors file(s)
    sources: tuple[str, ...]  # the model's state-dict names for it; several for tied weights, the first is read
    shape: tuple[int, ...]  # the full (unsharded) shape
    dtype: torch.dtype  # the dtype written
    parameter: bool = True  # a parameter (counted in the index's total_parameters), not a buffer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ExportPlan:
    """What an export holds: a full model (config.json + shards) or a peft adapter (adapter_model.safetensors)."""

    adapter: bool
    tensors: tuple[ExportTensor, ...]
    # transformers renames or re-lays out this model's weights on save (fused MoE experts, legacy names): the files
    # then hold other names than the plan, so `write_export` hands the gathered tensors to `save_pretrained`
    converted_on_save: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# --- planning --------------------------------------------------------------------------------------------------


def state_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for every entry of `module.state_dict()`, in its order, without calling it:
    FSDP2's state-dict hooks and ZeRO-3's empty partitions make `state_dict()` the wrong tool here. Tied weights
    appear under each of their names, as the same tensor object."""
    entries = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        entries += [(dot + n, t, True) for n, t in m._parameters.items() if t is not None]
        entries += [(dot + n, t, False) for n, t in m._buffers.items()
                    if t is not None and n not in m._non_persistent_buffers_set]
    return entries


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape (a ZeRO-3 parameter's own tensor is an empty placeholder; a DTensor's shape is global)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def export_plan(module: torch.nn.Module, *, precision: str = "fp32") -> ExportPlan:
    """The plan of `module`'s export: its adapter when it is a peft model, else the full model.

    Full fine-tuning exports in the training precision (bf16 runs write bf16, half the size of their fp32 master
    weights); adapters are written in fp32, as peft keeps them for training and loads them.
    """
    if hasattr(module, "peft_config"):
        return adapter_plan(module)
    return full_model_plan(module, dtype=torch.bfloat16 if precision == "bf16" else None)


def full_model_plan(model: torch.nn.Module, *, dtype: torch.dtype | None = None) -> ExportPlan:
    """Every tensor `save_pretrained` would write, under the same names: tied weights once (under the name
    transformers keeps), `_keys_to_ignore_on_save` left out. `dtype`: floating tensors are written in it (None:
    each in its own dtype)."""
    entries = state_tensors(model)
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    groups: dict[int, list[str]] = {}
    for name, tensor, _ in entries:
        groups.setdefault(id(tensor), []).append(name)
    dropped = _tied_names_to_drop(model, [names for names in groups.values() if len(names) > 1])
    tensors = []
    for name, tensor, is_param in entries:
        if name in ignore or name in dropped:
            continue
        out = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        aliases = tuple(groups[id(tensor)])
        tensors.append(ExportTensor(name, (name, *(a for a in aliases if a != name)), full_shape(tensor), out,
                                    parameter=is_param))
    return ExportPlan(adapter=False, tensors=tuple(tensors), converted_on_save=_converted_on_save(model, tensors))


def _tied_names_to_drop(model: torch.nn.Module, shared: list[list[str]]) -> set[str]:
    """As transformers' `remove_tied_weights_from_state_dict`: of the names sharing one tensor, drop those its tied
    weight keys declare (the tied copies, e.g. lm_head.weight), but keep at least one. Sharing that no tied key
    declares (transformers refuses to save it) keeps the first name."""
    patterns = []
    for prefix, m in model.named_modules():
        tied = getattr(m, "_tied_weights_keys", None) or {}
        patterns += [f"{prefix}.{k}" if prefix else k for k in tied]
    dropped = set()
    for names in shared:
        kept = list(names)
        for name in sorted(names):
            if len(kept) > 1 and any(re.search(p, name) for p in patterns):
                kept.remove(name)
                dropped.add(name)
        dropped.update(kept[1:])
    return dropped


def _converted_on_save(model: torch.nn.Module, tensors: list[ExportTensor]) -> bool:
    """Whether transformers 5 renames or re-lays out this model's weights on save (fused MoE experts, legacy
    names), judged on shape-only tensors."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: no conversions on save
        return False
    meta = {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors}
    try:
        reverted = revert_weight_conversion(model, dict(meta))
    except Exception:  # noqa: BLE001 - a conversion that needs real values
        return True
    return set(reverted) != set(meta) or any(reverted[k].shape != meta[k].shape for k in meta)


def adapter_plan(model: torch.nn.Module) -> ExportPlan:
    """The tensors `PeftModel.save_pretrained` would write, named as peft names them (`get_peft_model_state_dict`
    run on shape-only tensors: adapter name removed, only this adapter's weights), each written in fp32."""
    from peft import get_peft_model_state_dict

    names = list(model.peft_config)
    if names != ["default"]:
        raise ValueError(f"the export writes one adapter named 'default'; this model has {names}")
    entries = {name: (tensor, is_param) for name, tensor, is_param in state_tensors(model)}
    meta = {name: torch.empty(full_shape(t), dtype=t.dtype, device="meta") for name, (t, _) in entries.items()}
    source = {id(t): name for name, t in meta.items()}
    selected = get_peft_model_state_dict(model, state_dict=meta, adapter_name="default")
    tensors = []
    for out_name, t in selected.items():
        name = source[id(t)]
        tensor, is_param = entries[name]
        dtype = torch.float32 if tensor.dtype.is_floating_point else tensor.dtype
        tensors.append(ExportTensor(out_name, (name,), full_shape(tensor), dtype, parameter=is_param))
    return ExportPlan(adapter=True, tensors=tuple(tensors))


def to_export(tensor: torch.Tensor, item: ExportTensor) -> torch.Tensor:
    """`tensor` as the export stores it: on the CPU, in the planned dtype, contiguous."""
    return tensor.detach().to(device="cpu", dtype=item.dtype).contiguous()


def local_tensors(module: torch.nn.Module, plan: ExportPlan, *, rank: int) -> Iterator[tuple[ExportTensor, torch.Tensor | None]]:
    """The plan's tensors from a module whose weights are all local (DDP, ZeRO-1/2 frozen weights), for rank 0."""
    named = {name: t for name, t, _ in state_tensors(module)}
    for item in plan.tensors:
        yield item, (to_export(named[item.sources[0]], item) if rank == 0 else None)


# --- writing ---------------------------------------------------------------------------------------------------


def parse_size(size: int | str | None) -> int | None:
    """Bytes of a size written like save_pretrained's max_shard_size ("5GB", "500MB": decimal units, as
    huggingface_hub reads them); ValueError otherwise."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read {size!r} as a size; write it like 5GB, 500MB or 100KB")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def plan_files(tensors: Iterable[ExportTensor], *, weights_name: str = WEIGHTS_NAME,
               max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> dict[str, list[ExportTensor]]:
    """file name -> its tensors, in order: huggingface_hub's split (as `save_pretrained`), on sizes alone.
    `max_shard_size=None`: everything in `weights_name`."""
    tensors = list(tensors)
    if max_shard_size is None:
        return {weights_name: tensors}
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {t.name: t for t in tensors}
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda t: t.nbytes,
                                                 filename_pattern=pattern, max_shard_size=parse_size(max_shard_size))
    return {file: [by_name[n] for n in names] for file, names in split.filename_to_tensors.items()}


class _SafetensorsFile:
    """One safetensors file whose layout is fixed up front: the header (names, dtypes, shapes, offsets) is written
    first and each tensor's bytes go to their offset whenever that tensor arrives."""

    def __init__(self, path: Path, tensors: list[ExportTensor], metadata: dict[str, str]):
        self.path, self.partial = path, path.with_name(path.name + _PARTIAL)
        header: dict = {"__metadata__": metadata}
        self.offsets, offset = {}, 0
        for t in tensors:
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{t.name}: safetensors has no dtype {t.dtype}")
            header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            self.offsets[t.name] = offset
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.data_start, self.size = 8 + len(raw), 8 + len(raw) + offset
        self.pending = {t.name for t in tensors}
        self.file = open(self.partial, "wb")  # noqa: SIM115 - closed by finish/abort
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.file.seek(self.data_start + self.offsets[name])
        if tensor.numel():
            self.file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.pending.discard(name)

    def finish(self) -> None:
        self.file.truncate(self.size)  # a trailing empty tensor leaves nothing to seek past
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


class ShardedWriter:
    """Writes planned tensors, in any order, into Hugging Face safetensors shard(s) plus their index.

    Use as a context manager; `write(item, tensor)` each tensor once. Leaving the block without an error checks that
    every tensor was written, renames the files into place, writes the index (when sharded) and removes stale shard
    files of an earlier export; an error removes the partial files instead.
    """

    def __init__(self, out_dir: Path, tensors: Iterable[ExportTensor], *, weights_name: str = WEIGHTS_NAME,
                 max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE):
        self.out_dir, self.weights_name = Path(out_dir), weights_name
        self.tensors = list(tensors)
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("export plan names a tensor twice")
        self.files = plan_files(self.tensors, weights_name=weights_name, max_shard_size=max_shard_size)
        self.file_of = {t.name: file for file, ts in self.files.items() for t in ts}
        self._open: dict[str, _SafetensorsFile] = {}

    def __enter__(self) -> "ShardedWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for file, tensors in self.files.items():
                self._open[file] = _SafetensorsFile(self.out_dir / file, tensors, {"format": "pt"})
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, item: ExportTensor, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
            raise ValueError(f"{item.name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {item.shape} {item.dtype}")
        self._open[self.file_of[item.name]].write(item.name, tensor.contiguous())

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self._abort()
            return
        missing = sorted(n for f in self._open.values() for n in f.pending)
        if missing:
            self._abort()
            raise RuntimeError(f"export incomplete: {len(missing)} planned tensors never arrived, e.g. {missing[:3]}")
        for f in self._open.values():
            f.finish()
        index = self.out_dir / self.weights_name.replace(".safetensors", ".safetensors.index.json")
        if len(self.files) > 1:
            total_parameters = sum(math.prod(t.shape) for t in self.tensors if t.parameter)
            content = {"metadata": {"total_parameters": total_parameters, "total_size": sum(t.nbytes for t in self.tensors)},
                       "weight_map": dict(self.file_of)}
            _write_text(index, json.dumps(content, indent=2, sort_keys=True) + "\n")
        else:
            index.unlink(missing_ok=True)
        self._remove_stale()

    def _abort(self) -> None:
        for f in self._open.values():
            f.abort()

    def _remove_stale(self) -> None:
        """Weight files of an earlier export into the same directory that this one did not write."""
        stem = self.weights_name.removesuffix(".safetensors")
        stale = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors")
        for path in self.out_dir.iterdir():
            if stale.fullmatch(path.name) and path.name not in self.files:
                path.unlink()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + _PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_export(out_dir: Path, module: torch.nn.Module, plan: ExportPlan,
                 tensors: Iterable[tuple[ExportTensor, torch.Tensor | None]], *, rank: int, tokenizer=None,
                 max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write `plan` from `tensors` as a plain Hugging Face directory: weights, config.json and
    generation_config.json (full) or adapter_config.json and README.md (peft), and the tokenizer.

    Every rank calls this and drains `tensors` (whose gathers may be collective); rank 0 writes. Rank 0 holds one
    tensor at a time (the iterator's), never the whole state dict.
    """
    tensors = iter(tensors)
    if rank != 0:
        for _ in tensors:
            pass
        return
    weights_name = ADAPTER_WEIGHTS_NAME if plan.adapter else WEIGHTS_NAME
    out_dir = Path(out_dir)
    if plan.converted_on_save:
        _save_converted(out_dir, module, tensors, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return
    with ShardedWriter(out_dir, plan.tensors, weights_name=weights_name,
                       max_shard_size=None if plan.adapter else max_shard_size) as writer:
        for item, tensor in tensors:
            writer.write(item, tensor)
            del tensor  # before the iterator gathers the next one
    if plan.adapter:
        write_adapter_config(module, out_dir)
    else:
        write_model_config(module, out_dir, plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _save_converted(out_dir: Path, model: torch.nn.Module, tensors, *, max_shard_size) -> None:
    """A model whose weights transformers converts on save: the gathered tensors (one at a time, as always) are
    collected on rank 0 and `save_pretrained` applies the conversion — the whole model in rank 0's host memory,
    as every export did before exports were streamed."""
    log.warning("%s: transformers converts its weights on save; the export collects the whole model on rank 0 and "
                "writes it with save_pretrained", type(model).__name__)
    state = {item.name: tensor for item, tensor in tensors}
    model.config.use_cache = True
    try:
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True,
                              max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    finally:
        model.config.use_cache = False


def write_model_config(model: torch.nn.Module, out_dir: Path, plan: ExportPlan) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them (its `dtype` says what the files
    hold; `architectures` without FSDP2's class-name prefix; the KV cache on again for users' generation)."""
    config = copy.deepcopy(model.config)
    floating = [t.dtype for t in plan.tensors if t.dtype.is_floating_point]
    if floating:
        config.dtype = str(floating[0]).removeprefix("torch.")
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.use_cache = True
    config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def write_adapter_config(model: torch.nn.Module, out_dir: Path) -> None:
    """adapter_config.json and the model card, as `PeftModel.save_pretrained` writes them for adapter 'default'."""
    config = copy.deepcopy(model.peft_config["default"])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    for key, value in vars(config).items():  # peft writes sets in hash order; sorted, every export reads the same
        if isinstance(value, set):
            setattr(config, key, sorted(value))
    auto_mapping = None
    if config.task_type is None:
        base_class = model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    model.create_or_update_model_card(str(out_dir))
    config.save_pretrained(str(out_dir), auto_mapping_dict=auto_mapping)


# --- checking ---------------------------------------------------------------------------------------------------


def written_files(out_dir: Path) -> dict[str, str]:
    """tensor name -> file, from an export's index or its single weights file."""
    out_dir = Path(out_dir)
    index = out_dir / INDEX_NAME
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    for name in (WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME):
        if (out_dir / name).exists():
            with safe_open(str(out_dir / name), framework="pt") as f:
                return {key: name for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raise FileNotFoundError(f"{out_dir} holds no {WEIGHTS_NAME}, {INDEX_NAME} or {ADAPTER_WEIGHTS_NAME}")


def open_safetensors(path: str):
    """A safetensors file opened for reading tensors one at a time. The pread backend copies each tensor into memory
    of its own, so resident memory is exactly what is held (safetensors >= 0.8); a memory map would keep every page
    read resident, counted in the process's RSS, for as long as the file is open."""
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # older safetensors: no backend argument, a memory map
        return safe_open(path, framework="pt", device="cpu")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # NaNs compare too


def check_export_tensors(out_dir: Path, tensors: Iterable[tuple[ExportTensor, torch.Tensor | None]], *,
                         rank: int) -> dict | None:
    """Read every written tensor back (lazily, one at a time) and compare it bit for bit with the trained model's
    tensor from `tensors`; also that the files hold exactly the planned names. Every rank drains `tensors`; rank 0
    returns `{"check": "tensors", "tensors", "max_abs_tensor_diff", "mismatched", "ok"}`, the others None."""
    tensors = iter(tensors)
    if rank != 0:
        for _ in tensors:
            pass
        return None
    out_dir = Path(out_dir)
    file_of = written_files(out_dir)
    handles: dict = {}
    seen, mismatched, max_diff = set(), [], 0.0
    try:
        for item, tensor in tensors:
            seen.add(item.name)
            file = file_of.get(item.name)
            if file is None:
                mismatched.append(f"{item.name}: not in the export")
                continue
            if file not in handles:
                handles[file] = open_safetensors(str(out_dir / file))
            written = handles[file].get_tensor(item.name)
            if not _same_bits(written, tensor):
                if written.shape != tensor.shape or written.dtype != tensor.dtype:
                    mismatched.append(f"{item.name}: written {tuple(written.shape)} {written.dtype}, trained "
                                      f"{tuple(tensor.shape)} {tensor.dtype}")
                    max_diff = math.inf
                else:
                    diff = float((written.double() - tensor.double()).abs().nan_to_num(math.inf).max())
                    mismatched.append(f"{item.name}: max |diff| {diff:.3g}")
                    max_diff = max(max_diff, diff)
            del tensor, written
    finally:
        handles.clear()
    mismatched += [f"{name}: in the export but not in the trained model" for name in sorted(set(file_of) - seen)]
    return {"check": "tensors", "tensors": len(seen), "max_abs_tensor_diff": max_diff, "mismatched": mismatched[:10],
            "ok": not mismatched}
