"""A LoRA adapter merged into its base model, one tensor at a time (`method.merge_on_export`, and
`python -m distft.merge ADAPTER OUT` for an adapter exported earlier).

peft's `merge_and_unload` needs the whole base model in memory: 129 GiB of host RAM for Llama-2-70B in bf16. For
plain LoRA on linear layers the merge is local to each weight, W + scaling · (B @ A), so here the base checkpoint's
safetensors are read lazily, one tensor at a time: each targeted weight gets its adapter's delta and each tensor is
written into its place in the sharded output (distft.export_shards) before the next is read. The result is what
`PeftModel.from_pretrained(base).merge_and_unload().save_pretrained(out)` writes, bit for bit (tested): the same
arithmetic as peft's `Linear.merge` (fp32 adapters, as peft loads them onto a 16-bit base, the delta added into the
base weight in its dtype), the same tensor names, files, config.json and generation_config.json.

Adapters that are not plain LoRA on linear layers (DoRA, rank or alpha patterns, trained copies of base modules,
embedding adapters, ...) and bases that cannot be read tensor by tensor (no safetensors, keys transformers converts)
are merged by peft on the whole model instead, with a log line that says why.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from distft.errors import UserError
from distft.export_shards import (
    ADAPTER_WEIGHTS_NAME,
    ShardedWriter,
    full_model_plan,
    open_safetensors,
    write_model_config,
)
from distft.progress import Progress

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."  # peft's prefix of an adapter's tensor names
_ENDINGS = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# adapter_config.json settings under which the merge is not W + alpha/r · B @ A on the weight alone
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out", "rank_pattern": "a rank_pattern",
                "alpha_pattern": "an alpha_pattern", "modules_to_save": "trained copies of base modules",
                "lora_bias": "LoRA biases", "layer_replication": "layer replication",
                "trainable_token_indices": "trainable tokens"}


def merge_adapter(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str = "fp32") -> dict:
    """Merge the LoRA adapter in `adapter_dir` into an unquantised copy of the base in `dtype` and write a
    standalone model (weights, config, tokenizer) to `out_dir`. Returns how: {"streamed": bool, "tensors": n,
    "merged": n, "reason": why not streamed}."""
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    info = _merge_streamed(base_dir, adapter_dir, out_dir, dtype=dtype)
    if not info["streamed"]:
        log.warning("merge: %s, so peft merges it on the whole base model (%s in host memory)", info["reason"],
                    base_dir)
        _merge_whole(base_dir, adapter_dir, out_dir, dtype=dtype)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return info


def _merge_whole(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str) -> None:
    from peft import PeftModel

    from distft.model import load_model

    base = load_model(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out_dir, safe_serialization=True)


def _merge_streamed(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str) -> dict:
    from distft.model import load_model
    from distft.strategy.streaming import open_local_checkpoint

    adapters, scaling, problem = read_lora(adapter_dir)
    if problem:
        return {"streamed": False, "reason": problem}
    model = load_model(base_dir, dtype=dtype, empty=True)
    plan = full_model_plan(model)
    if plan.converted_on_save:
        return {"streamed": False, "reason": f"transformers converts {type(model).__name__}'s weights on save"}
    try:  # this process alone: the other ranks wait at the export's barrier
        checkpoint, problem = open_local_checkpoint(model)
    except Exception as e:  # noqa: BLE001 - any failure to read it is a reason to let peft load it instead
        checkpoint, problem = None, f"it could not be read ({type(e).__name__}: {e})"
    if problem:
        return {"streamed": False, "reason": f"the base model cannot be read tensor by tensor: {problem}"}
    try:
        targets = {f"{module}.weight": module for module in adapters}
        written = {name for item in plan.tensors for name in item.sources[:1]}
        tied = {alias for item in plan.tensors for alias in item.sources[1:]}
        if odd := sorted(t for t in targets if t not in written or t in tied):
            return {"streamed": False, "reason": f"the adapter targets {', '.join(odd[:3])}, which is tied to "
                                                 "another weight or not a weight of the base"}
        buffers = dict(model.named_buffers())
        merged = 0
        with ShardedWriter(out_dir, plan.tensors) as writer, \
                Progress("merge: writing the merged tensors", len(plan.tensors), unit="tensor") as progress:
            for item in plan.tensors:
                tensor = _read(checkpoint, item, buffers)
                if (module := targets.get(item.sources[0])) is not None:
                    a, b = adapters[module]["A"], adapters[module]["B"]
                    tensor += (b @ a) * scaling  # peft's Linear.merge: get_delta_weight(), added in place
                    merged += 1
                writer.write(item, tensor)
                del tensor
                progress.advance()
        write_model_config(model, out_dir, plan)
    finally:
        checkpoint.close()
    assert merged == len(targets), (merged, len(targets))
    return {"streamed": True, "tensors": len(plan.tensors), "merged": merged}


def _read(checkpoint, item, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """One planned tensor as from_pretrained would load it: from the checkpoint cast to its dtype, or (a persistent
    buffer the checkpoint lacks) as the model computed it."""
    key = next((name for name in item.sources if name in checkpoint.shapes), None)
    if key is not None:
        return checkpoint.read(key, item.dtype)
    return buffers[item.sources[0]].to(item.dtype).clone()


def read_lora(adapter_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float, str | None]:
    """The adapter's A and B matrices (fp32, as peft loads them onto a 16-bit base) by the base module's name, and
    its scaling; or why it is not plain LoRA on linear layers (then ({}, 0, reason))."""
    config = adapter_config(adapter_dir)
    if config.get("peft_type") != "LORA":
        return {}, 0.0, f"the adapter is {config.get('peft_type')}, not LoRA"
    if used := [what for key, what in _UNSUPPORTED.items() if config.get(key)]:
        return {}, 0.0, f"the adapter uses {', '.join(used)}"
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        # PiSSA, OLoRA, LoftQ, ... change the base weights at initialisation
        return {}, 0.0, f"the adapter was initialised with init_lora_weights={config['init_lora_weights']}"
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    handle = open_safetensors(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
        ending = next((e for e in _ENDINGS if key.endswith(e)), None)
        if ending is None or not key.startswith(_PREFIX):
            return {}, 0.0, f"the adapter holds {key}, which is not a LoRA A or B matrix of a linear layer"
        module = key[len(_PREFIX):-len(ending)]
        adapters.setdefault(module, {})[_ENDINGS[ending]] = handle.get_tensor(key).float()
    if incomplete := sorted(m for m, ab in adapters.items() if len(ab) != 2):
        return {}, 0.0, f"the adapter has only one of A and B for {', '.join(incomplete[:3])}"
    return adapters, scaling, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="a LoRA adapter directory (a LoRA/QLoRA run's export)")
    parser.add_argument("out", type=Path, help="directory to write the merged model to")
    parser.add_argument("--base", default=None,
                        help="base model directory or hub id (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16",
                        help="dtype of the merged weights (default bf16, the base's usual dtype)")
    args = parser.parse_args(argv)
    try:
        base = args.base or _adapter_base(args.adapter)
        info = merge_adapter(base, args.adapter, args.out, dtype=args.dtype)
    except UserError as e:
        print(f"distft.merge: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "base": base, "dtype": args.dtype, **info}, indent=2))
    return 0


def adapter_config(adapter_dir: Path) -> dict:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise UserError(f"{adapter_dir} holds no adapter_config.json: give the directory of a peft LoRA adapter "
                        "(a LoRA/QLoRA run's export)")
    return json.loads(config_file.read_text())


def _adapter_base(adapter_dir: Path) -> str:
    base = adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json records no base model (base_model_name_or_path); pass "
                        "--base DIR_OR_HUB_ID")
    return base

if __name__ == "__main__":
    sys.exit(main())
