"""Final export as a plain Hugging Face directory, then checked: by reloading it with plain transformers/peft and
comparing logits on a probe (`logits`), or, when a whole reload would not fit beside the training state, by reading
the written tensors back one at a time and comparing each with the trained model's (`tensors`)."""

import json
import logging
from pathlib import Path

import torch

from distft import dist, settings
from distft.dtypes import torch_dtype
from distft.export_shards import check_export_tensors, export_plan
from distft.merge import merge_adapter
from distft.model import count_params, load_model
from distft.progress import step
from distft.stop import NO_STOP, StopCheck

log = logging.getLogger(__name__)

EXPORT_CHECKS = ("auto", "logits", "tensors")  # run.export_check


def export_and_verify(strategy, tokenizer, *, export_dir: Path, probe: torch.Tensor, rank: int,
                      device: torch.device, method: str, dtype: str, quant_config, precision: str, run_dir: Path,
                      merge_base: str | None = None, merge_dtype: str = "fp32", stop: StopCheck = NO_STOP,
                      check: str = "auto") -> dict | None:
    """Export the trained model and check the export (`check`, run.export_check: `logits` reloads it as a user would
    and compares the logits on `probe`; `tensors` compares the written tensors one at a time; `auto` picks logits
    when the reload fits comfortably on rank 0's device); with `merge_base` (a LoRA/QLoRA run's base model) also
    write export/merged. Every rank takes part (sharded strategies gather collectively); rank 0 writes and checks,
    and returns the check (None elsewhere). A stop request is honoured between these parts (StopRequested; the
    caller removes the partial export)."""
    if check not in EXPORT_CHECKS:
        raise ValueError(f"run.export_check={check}: choose one of {', '.join(EXPORT_CHECKS)}")
    trained_logits = probe_logits(strategy, probe, device)
    with step(f"export: writing {export_dir}", enabled=rank == 0):
        export_model(strategy, tokenizer, export_dir, rank=rank)
        dist.barrier()
    stop.check("export")
    mode = None
    if rank == 0:  # rank 0 decides (its device would hold the reload); all follow, as the tensor check is collective
        size = reload_size(strategy.unwrap(), dtype=dtype, quantized=quant_config is not None)
        mode = choose_export_check(check, reload_bytes=size, free_bytes=free_memory_bytes(device))
        if mode == "tensors" and export_plan(strategy.unwrap(), precision=precision).converted_on_save:
            log.info("export check: transformers converted the weights' names on save; reloading it instead")
            mode = "logits"
    mode = dist.all_gather_objects(mode)[0]
    info = None
    if mode == "tensors":
        with step("export: reading the written tensors back and comparing them with the trained ones",
                  enabled=rank == 0):
            info = verify_export_tensors(strategy, export_dir, rank=rank)
        if rank == 0:  # the probe still lets anyone repeat the logits check where the model fits
            torch.save({"input_ids": probe.cpu(), "logits": trained_logits, "method": method},
                       run_dir / "export_probe.pt")
    elif rank == 0:
        with step("export: reloading it with plain transformers/peft to check the logits"):
            info = verify_export(export_dir, probe=probe, trained_logits=trained_logits, method=method, dtype=dtype,
                                 quant_config=quant_config, device=device, run_dir=run_dir, precision=precision)
    if rank == 0 and merge_base is not None and not stop.local():
        with step(f"export: merging the adapter into {merge_base}"):
            merge_adapter(merge_base, export_dir, export_dir / "merged", dtype=merge_dtype)
    dist.barrier()
    stop.check("export")
    return info


def choose_export_check(mode: str, *, reload_bytes: int, free_bytes: int | None) -> str:
    """run.export_check as a decision: `logits` or `tensors` as set, and for `auto` logits when reloading the
    export needs at most settings.RELOAD_SHARE of the free memory (unknown free memory: logits, as before)."""
    if mode not in EXPORT_CHECKS:
        raise ValueError(f"run.export_check={mode}: choose one of {', '.join(EXPORT_CHECKS)}")
    if mode != "auto":
        return mode
    if free_bytes is None or reload_bytes <= settings.RELOAD_SHARE * free_bytes:
        return "logits"
    log.info("export check: reloading the export needs ~%.1f GiB, %.1f GiB free on this device: comparing the "
             "written tensors instead of reloading (run.export_check=logits forces the reload)",
             reload_bytes / 2**30, free_bytes / 2**30)
    return "tensors"


def reload_size(model: torch.nn.Module, *, dtype: str, quantized: bool) -> int:
    """About what reloading the export takes on one device: every base weight in `dtype` (4-bit: half a byte)."""
    _, total = count_params(model)
    return int(total * (0.5 if quantized else torch_dtype(dtype).itemsize))


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of `device` now: CUDA's free bytes, or the host's available memory for a CPU device."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: unknown
        return None


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
    info = {"check": "logits", "max_abs_logit_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance}
    if not info["ok"]:
        raise RuntimeError(f"export check failed: reloaded {export_dir} differs from the trained model by {diff:.3g} "
                           f"(tolerance {tolerance:.3g})")
    log.info("export verified: max |logit diff| = %.3g", diff)
    return info


def verify_export_tensors(strategy, export_dir: Path, *, rank: int) -> dict | None:
    """Compare every tensor written in `export_dir` with the trained model's, gathered again one at a time
    (collective; rank 0 reads the files lazily and returns the result). No full model is loaded anywhere."""
    info = check_export_tensors(export_dir, strategy.export_tensors(rank), rank=rank)
    if info is not None:
        if not info["ok"]:
            raise RuntimeError(f"export check failed: {export_dir} does not hold the trained tensors: "
                               + "; ".join(info["mismatched"]))
        log.info("export verified: %d tensors identical to the trained model's", info["tensors"])
    return info


# --- the model card and the Hub ---------------------------------------------------------------------------------

# Hub ids of the bases distft builds locally (model.source=embedded is SmolLM2-135M-Instruct, converted from GGUF)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATASET_HUB_IDS = {"gsm8k": "openai/gsm8k"}


def base_model_id(model_cfg) -> str | None:
    """The base model as a Hub id when one is known: model.path of a hub model (not a local directory), the embedded
    model's origin; None for random-initialised models and local directories."""
    if model_cfg.source == "embedded":
        return EMBEDDED_HUB_ID
    path = model_cfg.get("path")
    if model_cfg.source == "hub" and path and not Path(path).exists():
        return str(path)
    return None


def write_model_card(export_dir: Path, *, cfg, tokenizer, template: str, steps: int, lr: float,
                     train_loss: float | None, metrics: dict | None, check: dict | None) -> None:
    """README.md of the export, Hub style: metadata (base model, library, dataset, tags) and what was trained, on
    what, how to prompt it and how it scored. Replaces peft's template card."""
    from huggingface_hub import ModelCard, ModelCardData

    from distft.data import format_prompt, resolve_template

    adapter = (export_dir / "adapter_config.json").exists()
    base = base_model_id(cfg.model)
    data_name = cfg.data.name
    card_data = ModelCardData(
        base_model=base, library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        datasets=[DATASET_HUB_IDS[data_name]] if data_name in DATASET_HUB_IDS else None,
        tags=list(dict.fromkeys(["distft", cfg.method.name, cfg.strategy.name, *(["lora"] if adapter else [])])))
    resolved = resolve_template(tokenizer, template)
    example = format_prompt(tokenizer, [{"role": "user", "content": "{question}"}], template)
    scores = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    t, m = cfg.trainer, cfg.method
    lines = [
        f"# {cfg.run.name}", "",
        f"{'A LoRA adapter for' if adapter else 'A fine-tune of'} **{base or cfg.model.name}**, trained with "
        f"distft ({m.name}, strategy {cfg.strategy.name}, "
        f"{cfg.scaling.num_workers} worker(s)).", "",
        "## Training", "",
        f"- data: {data_name} ({cfg.data.get('path') or DATASET_HUB_IDS.get(data_name, '')}), sequences of "
        f"{cfg.data.seq_len} tokens{', packed' if cfg.data.packing else ''}; loss on answer tokens only",
        f"- {steps} optimizer steps, global batch {t.global_batch_size}, lr {lr:g}, {t.lr_schedule} schedule, "
        f"precision {t.precision}" + (f"; final train loss {train_loss:.4f}" if train_loss is not None else ""),
        *([f"- LoRA r={m.lora_r}, alpha={m.lora_alpha}, dropout={m.lora_dropout}, targets {list(m.target_modules)}"
           + (f", 4-bit {m.quant_type} base" if m.name == "qlora" else "")] if m.name != "full" else []),
        "", "## Prompt", "",
        f"Template `{resolved}`; a question is sent as:", "", "```", example, "```", "",
        "## Evaluation", "",
        *(["| metric | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in scores.items()]]
          if scores else ["Not evaluated (eval.enabled=false)."]),
        "", "## Use", "", "```python",
        *(["from peft import AutoPeftModelForCausalLM", "", 'model = AutoPeftModelForCausalLM.from_pretrained("PATH")']
          if adapter else ["from transformers import AutoModelForCausalLM", "",
                           'model = AutoModelForCausalLM.from_pretrained("PATH")']),
        "```", "",
        f"The export was checked after writing ({(check or {}).get('check', 'logits')}: "
        f"{'passed' if (check or {}).get('ok') else 'not run'}).",
    ]
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(export_dir / "README.md")


def push_to_hub(export_dir: Path, repo_id: str) -> dict:
    """Upload the export to the Hub repo `repo_id` (run.push_to_hub). Never fails the run: offline, without a token
    or without access it is skipped with the reason and the command to push later."""
    from huggingface_hub import HfApi, constants

    later = f"push it later with `huggingface-cli upload {repo_id} {export_dir}`"
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(export_dir), commit_message="distft export")
            log.info("pushed %s to %s", export_dir, commit.repo_url)
            return {"repo": repo_id, "url": str(commit.repo_url)}
        except Exception as e:  # noqa: BLE001 - offline, no token, no permission: the export on disk is complete
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    log.warning("run.push_to_hub=%s skipped: %s; the export is complete in %s — %s", repo_id, reason, export_dir,
                later)
    return {"repo": repo_id, "skipped": reason, "push_later": later}
