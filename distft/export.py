"""Final export as a plain Hugging Face directory, checked by reloading it and comparing logits."""

import json
import logging
from pathlib import Path

import torch

from distft import dist
from distft.model import load_model
from distft.progress import step
from distft.stop import NO_STOP, StopCheck

log = logging.getLogger(__name__)


def export_and_verify(strategy, tokenizer, *, export_dir: Path, probe: torch.Tensor, rank: int,
                      device: torch.device, method: str, dtype: str, quant_config, precision: str, run_dir: Path,
                      merge_base: str | None = None, merge_dtype: str = "fp32", stop: StopCheck = NO_STOP) -> dict | None:
    """Export the trained model, reload the export as a user would and check it reproduces the trained logits on
    `probe`; with `merge_base` (a LoRA/QLoRA run's base model) also write export/merged. Every rank takes part
    (sharded strategies gather collectively); rank 0 writes and checks, and returns the check (None elsewhere).
    A stop request is honoured between these parts (StopRequested; the caller removes the partial export)."""
    trained_logits = probe_logits(strategy, probe, device)
    with step(f"export: writing {export_dir}", enabled=rank == 0):
        export_model(strategy, tokenizer, export_dir, rank=rank)
        dist.barrier()
    stop.check("export")
    info = None
    if rank == 0:
        with step("export: reloading it with plain transformers/peft to check the logits"):
            info = verify_export(export_dir, probe=probe, trained_logits=trained_logits, method=method, dtype=dtype,
                                 quant_config=quant_config, device=device, run_dir=run_dir, precision=precision)
        if merge_base is not None and not stop.local():
            with step(f"export: merging the adapter into {merge_base}"):
                merge_adapter(merge_base, export_dir, export_dir / "merged", dtype=merge_dtype)
    dist.barrier()
    stop.check("export")
    return info


@torch.no_grad()
def probe_logits(strategy, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The trained model's logits on one input, computed by every rank (sharded models need all of them)."""
    model = strategy.model
    was_training = model.training
    model.eval()
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


def export_model(strategy, tokenizer, out_dir: Path, *, rank: int) -> None:
    """LoRA/QLoRA: adapter (adapter_config.json + adapter_model.safetensors) + tokenizer. Full: model + tokenizer."""
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    strategy.export(out_dir, tokenizer, rank)


def load_export(export_dir: Path, *, dtype: str, quant_config=None, device: torch.device | None = None):
    """Load an export the way a user would, with plain transformers / peft."""
    export_dir = Path(export_dir)
    if (export_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = json.loads((export_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_model(base_dir, dtype=dtype, quantization_config=quant_config, device=device)
        return PeftModel.from_pretrained(base, export_dir).to(device or "cpu")
    return load_model(str(export_dir), dtype=dtype, device=device)


@torch.no_grad()
def verify_export(export_dir: Path, *, probe: torch.Tensor, trained_logits: torch.Tensor, method: str, dtype: str,
                  quant_config, device, run_dir: Path, precision: str = "fp32") -> dict:
    """Reload the export as a user would and compare its logits with the trained model's on `probe`.

    Saves the probe (input and trained logits) as run_dir/export_probe.pt so anyone can repeat the check.
    """
    reloaded_model = load_export(export_dir, dtype=dtype, quant_config=quant_config, device=device)
    reloaded_model.eval()
    reloaded = reloaded_model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    del reloaded_model
    diff = float((trained_logits - reloaded).abs().max())
    scale = float(trained_logits.abs().max())
    # fp32 reloads are exact in practice; 4-bit kernels take other code paths for inference (about 1e-4 off);
    # bf16 training probes a bf16 copy of the weights, so compare at bf16 precision then.
    rel = 2e-2 if "bf16" in (dtype, precision) else (2e-3 if quant_config is not None else 1e-4)
    tolerance = rel * max(1.0, scale)
    torch.save({"input_ids": probe.cpu(), "logits": trained_logits, "method": method}, run_dir / "export_probe.pt")
    info = {"max_abs_logit_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance}
    if not info["ok"]:
        raise RuntimeError(f"export check failed: reloaded {export_dir} differs from the trained model by {diff:.3g} "
                           f"(tolerance {tolerance:.3g})")
    log.info("export verified: max |logit diff| = %.3g", diff)
    return info


def merge_adapter(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str = "fp32") -> None:
    """Merge a LoRA/QLoRA adapter into an unquantised copy of the base and save a standalone model."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_model(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
