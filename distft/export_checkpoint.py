"""`python -m distft.export_checkpoint CHECKPOINT OUT`: a distft training checkpoint as a plain Hugging Face
directory, offline: no GPU, no process group, and the checkpoint read a bounded amount at a time.

The run's config.yaml (in the run directory, beside its checkpoint_NNNNNN directories) says the base model, the
method and the precision; the checkpoint's files say who wrote it: FSDP (DCP shards under fsdp_dcp/, read a group of
tensors at a time), DeepSpeed (ZeRO partitions under ds/, merged one tensor at a time by DeepSpeed's zero_to_fp32)
or DDP (one safetensors file, read lazily). A LoRA/QLoRA checkpoint holds only the adapters (frozen weights are never
saved), so it becomes an adapter export for the base model; a full fine-tuning checkpoint becomes a full model with
the base model's config.json, generation_config.json and tokenizer. The output is what the run's own export writes
(distft.export_shards), loadable by plain `AutoModelForCausalLM.from_pretrained` / `PeftModel.from_pretrained`.

Memory: FSDP at most `_READ_BYTES` of tensors (or one larger tensor) at a time; ZeRO-3 one tensor (its partitions
are memory-mapped); DDP one tensor. ZeRO-1/2 checkpoints are merged by DeepSpeed, which concatenates each rank's
fp32 partition first: the trainable weights in fp32 (stages 1/2 only run models whose weights fit every GPU).
"""

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from distft.errors import UserError
from distft.export_shards import DEFAULT_MAX_SHARD_SIZE, ExportPlan, ExportTensor, parse_size, to_export

_READ_BYTES = 2**30  # FSDP: DCP reads tensors in groups of about this many bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.export_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint_NNNNNN directory of a run (it holds distft_checkpoint.json)")
    parser.add_argument("out", type=Path, help="directory to write the export to (new or empty)")
    parser.add_argument("--config", type=Path, default=None,
                        help="the run's config.yaml (default: config.yaml in the checkpoint's parent, the run "
                             "directory)")
    parser.add_argument("--model-dir", default=None,
                        help="base model directory or hub id (default: the config's model.*, as the run resolved it)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest weights file of a full model, e.g. 5GB (default {DEFAULT_MAX_SHARD_SIZE}, as "
                             "transformers' save_pretrained)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="dtype of a full model's weights (default auto: the run's trainer.precision, as its own "
                             "export; adapters are always fp32)")
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.out, config=args.config, model_dir=args.model_dir,
                                   max_shard_size=args.max_shard_size, dtype=None if args.dtype == "auto" else args.dtype)
    except UserError as e:
        print(f"distft.export_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def export_checkpoint(checkpoint: Path, out_dir: Path, *, config: Path | None = None, model_dir: str | None = None,
                      max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None) -> dict:
    """Write the Hugging Face export of `checkpoint` to `out_dir`; returns what was written.

    Args:
        checkpoint: a complete checkpoint_NNNNNN directory.
        out_dir: the export directory (created; refused if it holds files).
        config: the run's config.yaml; None: `checkpoint`'s parent directory's.
        model_dir: the base model; None: resolved from the config's model.* as the run did.
        max_shard_size: largest weights file of a full model.
        dtype: "fp32" | "bf16" for a full model's weights; None: the run's trainer.precision.
    """
    from distft.checkpoint import check_checkpoint, read_meta
    from distft.export_shards import export_plan, full_model_plan, write_export

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: no such directory; pass a checkpoint_NNNNNN directory of a run")
    try:
        max_shard_size = parse_size(max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size {max_shard_size}: {e}") from e
    problem = check_checkpoint(checkpoint)
    if problem:
        hint = ""
        if checkpoint.is_dir() and any(checkpoint.glob("checkpoint_*")):
            hint = f"; {checkpoint} looks like a run directory: pass one of its checkpoint_NNNNNN directories"
        raise UserError(f"{checkpoint} is not a complete distft checkpoint: {problem}{hint}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty directory; choose a new directory or remove it")
    cfg = _run_config(checkpoint, config)
    meta = read_meta(checkpoint)
    if meta.get("method") not in (None, cfg.method.name):
        raise UserError(f"{checkpoint} was written by a method={meta['method']} run but the config says "
                        f"method={cfg.method.name}; pass the run's own config with --config")
    fmt = detect_format(checkpoint, strategy=meta.get("strategy"))
    model_dir = model_dir or _model_dir(cfg)
    module = _model_skeleton(cfg, model_dir)
    if dtype is not None and not hasattr(module, "peft_config"):
        from distft.dtypes import torch_dtype

        plan = full_model_plan(module, dtype=torch_dtype(dtype))
    else:
        plan = export_plan(module, precision=cfg.trainer.precision)
    reader = {"fsdp": _dcp_tensors, "deepspeed": _deepspeed_tensors, "ddp": _safetensors_tensors}[fmt]
    from distft.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir, revision=cfg.model.get("revision"))
    write_export(out_dir, module, plan, reader(checkpoint, plan), rank=0, tokenizer=tokenizer,
                 max_shard_size=max_shard_size)
    return {"export_dir": str(out_dir), "kind": "adapter" if plan.adapter else "full", "checkpoint": str(checkpoint),
            "format": fmt, "step": meta.get("step"), "base_model": model_dir, "tensors": len(plan.tensors),
            "bytes": plan.nbytes}


def detect_format(checkpoint: Path, *, strategy: str | None = None) -> str:
    """Which strategy's files `checkpoint` holds: fsdp, deepspeed or ddp."""
    from distft.strategy.ddp import CHECKPOINT_FILE
    from distft.strategy.deepspeed import TAG
    from distft.strategy.fsdp import DCP_SUBDIR

    markers = {"fsdp": f"{DCP_SUBDIR}/.metadata", "deepspeed": f"{TAG}/", "ddp": CHECKPOINT_FILE}
    for name, marker in markers.items():
        if (checkpoint / marker).exists():
            return name
    found = sorted(p.name for p in checkpoint.iterdir())
    raise UserError(f"{checkpoint} holds no model weights in a format this converter reads (written by "
                    f"strategy={strategy or 'unknown'}; found {found}); it reads "
                    + ", ".join(f"{name} ({marker})" for name, marker in markers.items()))


def _run_config(checkpoint: Path, config: Path | None):
    from omegaconf import OmegaConf

    path = config or checkpoint.resolve().parent / "config.yaml"
    if not path.is_file():
        if config is not None:
            raise UserError(f"--config {config}: no such file")
        raise UserError(f"{path} is missing: the run's config.yaml (in the run directory, beside its checkpoints) "
                        "says the base model and method; pass it with --config RUN_DIR/config.yaml")
    cfg = OmegaConf.load(path)
    missing = [key for key in ("model", "method", "trainer") if key not in cfg]
    if missing:
        raise UserError(f"{path} is not a distft run config (it lacks {', '.join(missing)}); pass the run's "
                        "config.yaml with --config")
    return cfg


def _model_dir(cfg) -> str:
    from omegaconf import OmegaConf

    from distft.model import resolve_model_dir

    return resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))


def _model_skeleton(cfg, model_dir: str) -> torch.nn.Module:
    """The trained model's structure on the meta device (no weights read): the base model's architecture with the
    run's method applied, which names every tensor of the checkpoint and the export."""
    from distft import settings
    from distft.methods import apply_method
    from distft.model import load_model

    method, trainer = cfg.method, cfg.trainer
    dtype = settings.load_dtype(method.name, precision=trainer.precision, compute=method.get("compute_dtype"))
    model = load_model(model_dir, dtype=dtype, empty=True, revision=cfg.model.get("revision"),
                       attn_implementation=cfg.model.get("attn_implementation", "sdpa"))
    # QLoRA's adapters have the same names and shapes on an unquantised base; nothing is quantised offline
    name = "lora" if method.name == "qlora" else method.name
    return apply_method(model, name=name, lora_r=method.lora_r, lora_alpha=method.lora_alpha,
                        lora_dropout=method.lora_dropout, target_modules=list(method.target_modules))


def _resolve(plan: ExportPlan, available, checkpoint: Path) -> list[tuple[ExportTensor, str]]:
    """Each planned tensor with the name the checkpoint stores it under (tied weights: any of their names)."""
    resolved, missing = [], []
    for item in plan.tensors:
        name = next((n for n in item.sources if n in available), None)
        if name is None:
            missing.append(item.sources[0])
        else:
            resolved.append((item, name))
    if missing:
        raise UserError(f"{checkpoint} lacks {len(missing)} of the {len(plan.tensors)} tensors the export needs, "
                        f"e.g. {missing[:3]}: was it written by this run? Pass the run's config with --config (and "
                        "its base model with --model-dir)")
    return resolved


def _dcp_tensors(checkpoint: Path, plan: ExportPlan) -> Iterator[tuple[ExportTensor, torch.Tensor]]:
    """FSDP: the model entries of the DCP checkpoint, loaded without a process group a group of tensors at a time
    (DCP assembles each full tensor from every rank's shards)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from distft.strategy.fsdp import DCP_SUBDIR

    path = str(checkpoint / DCP_SUBDIR)
    stored = {key.removeprefix("model."): value
              for key, value in FileSystemReader(path).read_metadata().state_dict_metadata.items()
              if key.startswith("model.") and isinstance(value, TensorStorageMetadata)}
    batch, size = [], 0
    for item, name in [*_resolve(plan, stored, checkpoint), (None, None)]:
        if batch and (item is None or size + item.nbytes > _READ_BYTES):
            state = {"model": {n: torch.empty(tuple(stored[n].size), dtype=stored[n].properties.dtype)
                               for _, n in batch}}
            with warnings.catch_warnings():  # no_dist is what we ask for; torch warns about it on every load
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load(state, storage_reader=FileSystemReader(path), no_dist=True)
            for planned, n in batch:
                yield planned, to_export(state["model"].pop(n), planned)
            batch, size = [], 0
        if item is not None:
            batch.append((item, name))
            size += item.nbytes


def _deepspeed_tensors(checkpoint: Path, plan: ExportPlan) -> Iterator[tuple[ExportTensor, torch.Tensor]]:
    """DeepSpeed: the fp32 master weights from the ZeRO partitions (DeepSpeed's zero_to_fp32 in lazy mode: each
    tensor is assembled from the memory-mapped partitions when it is read)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks an accelerator on import
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from distft.strategy.deepspeed import TAG

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG, lazy_mode=True)
    for item, name in _resolve(plan, state, checkpoint):
        yield item, to_export(state[name].contiguous(), item)


def _safetensors_tensors(checkpoint: Path, plan: ExportPlan) -> Iterator[tuple[ExportTensor, torch.Tensor]]:
    """DDP: rank 0's trainable weights, one safetensors file read lazily."""
    from safetensors import safe_open

    from distft.strategy.ddp import CHECKPOINT_FILE

    with safe_open(str(checkpoint / CHECKPOINT_FILE), framework="pt") as f:
        for item, name in _resolve(plan, set(f.keys()), checkpoint):
            yield item, to_export(f.get_tensor(name), item)


if __name__ == "__main__":
    sys.exit(main())
