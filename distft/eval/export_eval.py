"""The task's metric (GSM8K accuracy, SQL/ViGGO exact match) of an exported checkpoint, batched greedy generation
spread over Ray actors.

Independent of how the model was trained or sharded: each actor loads the export the way a user would (a full model
directory, or a LoRA adapter on the base its adapter_config.json names; QLoRA adapters on a 4-bit base), and Ray Data
feeds it batches of prompts (`map_batches` over an actor pool). Prompts, greedy decoding and scoring are the same
functions the training-time evaluation uses, and the run's config.yaml (next to the export) supplies the template,
system prompt and data path, so the numbers agree with training-time eval on the same examples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from distft.errors import UserError


def run_config(export_dir: Path) -> dict:
    """The training run's config.yaml when the export sits in a run directory, else {}."""
    path = Path(export_dir).parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def export_kind(export_dir: Path) -> str:
    export_dir = Path(export_dir)
    if (export_dir / "adapter_config.json").exists():
        return "adapter"
    if (export_dir / "config.json").exists():
        return "model"
    raise UserError(f"{export_dir} is not an export: it has neither adapter_config.json (LoRA/QLoRA adapter) nor "
                    "config.json (full model); pass a run's export/ directory")


def build_prompts(tokenizer, *, task: str, data_path: str | None, hub_id: str, template: str,
                  system_prompt: str | None, limit: int | None, fewshot: int = 0, fewshot_seed: int = 1234):
    """(prompts, examples) for the task's test split, formatted exactly as in training-time eval."""
    from distft.data import format_prompt, load_examples, with_fewshot

    examples = load_examples(task, data_path, "test", hub_id=hub_id, limit=limit, system_prompt=system_prompt)
    shown = examples
    if fewshot:
        train = load_examples(task, data_path, "train", hub_id=hub_id, system_prompt=system_prompt)
        shown = with_fewshot(examples, train, fewshot, fewshot_seed)
    return [format_prompt(tokenizer, e.messages, template) for e in shown], examples


class Generator:
    """Ray Data actor: loads the export once, then greedily completes batches of prompts."""

    def __init__(self, export_dir: str, *, dtype: str, quant: dict | None, max_new_tokens: int, batch_size: int,
                 threads: int, add_special_tokens: bool = False, stop: tuple[str, ...] = ()):
        import torch

        from distft.export import load_export
        from distft.model import load_tokenizer

        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        quant_config = None
        if quant is not None:
            from distft.methods import quantization_config

            quant_config = quantization_config(**quant)
        self.model = load_export(Path(export_dir), dtype=dtype, quant_config=quant_config, device=device)
        self.tokenizer = load_tokenizer(export_dir)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.add_special_tokens, self.stop = add_special_tokens, stop

    def __call__(self, batch: dict) -> dict:
        from distft.eval import greedy_generate

        texts = greedy_generate(self.model, self.tokenizer, [str(p) for p in batch["prompt"]],
                                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                add_special_tokens=self.add_special_tokens, stop=self.stop)
        return {"index": batch["index"], "output": texts}


def evaluate_export(export_dir: Path, *, examples: int | None = None, workers: int = 1, batch_size: int = 16,
                    max_new_tokens: int | None = None, data_path: str | None = None, template: str | None = None,
                    cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> dict:
    """Score an export on its task's test split (the run's data.name; GSM8K outside a run directory) with
    `workers` Ray actors; Ray must be initialised."""
    import ray

    from distft.data.format import resolve_template, stop_strings
    from distft.eval import wilson_interval
    from distft.eval.evaluate import predictions as prediction_rows
    from distft.eval.tasks import get_task
    from distft.model import load_tokenizer

    export_dir = Path(export_dir).resolve()
    kind = export_kind(export_dir)
    cfg = run_config(export_dir)
    data_cfg, eval_cfg = cfg.get("data") or {}, cfg.get("eval") or {}
    method_cfg, trainer_cfg = cfg.get("method") or {}, cfg.get("trainer") or {}
    task = get_task(data_cfg.get("name", "gsm8k"))
    if task is None:
        raise UserError(f"{export_dir}: the run trained on data.name={data_cfg.get('name')}, which has no generation "
                        "metric (distft.eval scores gsm8k, sql and viggo)")
    if data_path is None:
        data_path = data_cfg.get("path")
    tokenizer = load_tokenizer(str(export_dir))
    template = resolve_template(tokenizer, template or data_cfg.get("template", "auto"))
    max_new_tokens = max_new_tokens or eval_cfg.get("max_new_tokens", 256)
    prompts, test = build_prompts(
        tokenizer, task=task.name, data_path=data_path, hub_id=data_cfg.get("hub_id", "openai/gsm8k"),
        template=template, system_prompt=data_cfg.get("system_prompt"), limit=examples,
        fewshot=eval_cfg.get("fewshot", 0), fewshot_seed=eval_cfg.get("fewshot_seed", 1234))

    precision = trainer_cfg.get("precision", "fp32")
    compute = method_cfg.get("compute_dtype") or precision
    quant = None
    if kind == "adapter" and method_cfg.get("name") == "qlora":  # the adapter was trained on a 4-bit base
        quant = dict(quant_type=method_cfg.get("quant_type", "nf4"), double_quant=method_cfg.get("double_quant", True),
                     compute_dtype=compute, quant_storage=method_cfg.get("quant_storage"))
    dtype = "fp32" if kind == "model" and precision == "fp32" else compute

    # Longest prompts first and sorted, so each batch pads little; the index restores the order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    started = time.time()
    ds = ray.data.from_items([{"index": i, "prompt": prompts[i]} for i in order],
                             override_num_blocks=max(1, min(len(prompts), workers * 4)))
    outputs = ds.map_batches(
        Generator, batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs=dict(export_dir=str(export_dir), dtype=dtype, quant=quant,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   threads=int(max(1, cpus_per_worker)),
                                   add_special_tokens=template == "plain",  # BOS on plain prompts, as in training
                                   stop=stop_strings(template)),
    ).take_all()
    by_index = {int(r["index"]): str(r["output"]) for r in outputs}
    if len(by_index) != len(prompts):
        raise RuntimeError(f"{len(by_index)} generations came back for {len(prompts)} prompts")
    outputs = [by_index[i] for i in range(len(prompts))]
    result = task.score(outputs, test)
    rows = prediction_rows(test, outputs, result.pop("per_example"))
    result["ci95"] = list(wilson_interval(result["correct"], result["num_examples"]))
    if task.name == "gsm8k":
        result["gsm8k_ci95"] = result["ci95"]
    result.update({
        "export_dir": str(export_dir), "export_kind": kind, "method": method_cfg.get("name"), "template": template,
        "max_new_tokens": max_new_tokens, "workers": workers, "batch_size": batch_size, "dtype": dtype,
        "seconds": time.time() - started,
        "samples": [{"question": r["prompt"], "output": r["output"], "gold": r["gold"]} for r in rows[:3]],
        "outputs": outputs, "predictions": rows,
    })
    return result


def default_output(export_dir: Path) -> Path:
    """<run dir>/eval_<task>.json beside the export (eval_gsm8k.json for GSM8K), else ./eval_<task>.json."""
    export_dir = Path(export_dir).resolve()
    name = f"eval_{(run_config(export_dir).get('data') or {}).get('name', 'gsm8k')}.json"
    if (export_dir.parent / "config.yaml").exists():
        return export_dir.parent / name
    return Path.cwd() / name


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
