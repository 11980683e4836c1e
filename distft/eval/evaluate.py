"""Evaluation inside a training run: eval loss on answer tokens and the task's generation metric (GSM8K, SQL,
ViGGO: `distft.eval.tasks`) by greedy decoding, with every rank on a disjoint shard of the test split."""

import math

import torch

from distft import dist, settings
from distft.data import (
    ShardedBatches,
    encode_examples,
    format_prompt,
    pack_examples,
    resolve_template,
    stop_strings,
    unpacked_rows,
)
from distft.eval.generate import greedy_generate
from distft.loss import causal_lm_loss_sum, model_inputs
from distft.progress import Progress
from distft.stop import NO_STOP, StopCheck

SAMPLES = 3  # generations kept in the result itself (summary.json); every one goes to the predictions file


@torch.no_grad()
def evaluate(strategy, tokenizer, *, losses, scored, task, template: str, seq_len: int, packing: bool,
             micro_batch_size: int, max_new_tokens: int, batch_size: int, rank: int, world: int,
             device: torch.device, stop: StopCheck = NO_STOP, label: str = "evaluation", gather: str = "full") -> dict:
    """Eval loss over the examples `losses` and the task's metric over `scored` (greedy generation; none when
    `task` is None or `scored` is empty). The result's "predictions" holds every scored question's output.

    Every rank runs the same number of loss batches (shards are padded), so sharded models can run their
    collectives, and the ranks agree after each one whether to stop (`stop`: raises StopRequested). Generation runs
    on the model the strategy hands out for it, without collectives: each rank stops at its next batch once it
    sees a stop request, and the ranks agree after generating — unless `gather` (eval.gather) leaves a sharded
    model sharded: then the ranks decode in step and agree on stopping before every batch.
    """
    model = strategy.model
    was_training = model.training
    model.eval()
    try:
        out = eval_loss(strategy, tokenizer, losses, template=template, seq_len=seq_len, packing=packing,
                        micro_batch_size=micro_batch_size, rank=rank, world=world, device=device, stop=stop,
                        label=label)
        if task is not None and scored:
            out.update(task_accuracy(strategy, tokenizer, scored, task=task, template=template,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, rank=rank, world=world,
                                     stop=stop, label=label,
                                     layerwise=generates_layerwise(gather, strategy, device)))
    finally:
        model.train(was_training)
    return out


def eval_loss(strategy, tokenizer, examples, *, template: str, seq_len: int, packing: bool, micro_batch_size: int,
              rank: int, world: int, device: torch.device, stop: StopCheck, label: str) -> dict:
    """Mean loss per answer token, every rank on its shard (padded to the same number of batches)."""
    encoded, _ = encode_examples(tokenizer, examples, template, seq_len)
    rows = pack_examples(encoded, seq_len, tokenizer.pad_token_id) if packing else unpacked_rows(encoded)
    loader = ShardedBatches(rows, micro_batch_size=micro_batch_size, rank=rank, world_size=world,
                            seed=0, shuffle=False, pad_id=tokenizer.pad_token_id, pad_to_equal=True)
    loss_sum = tokens = 0.0
    with Progress(f"{label}: eval loss", len(loader), unit="batches", enabled=rank == 0) as progress:
        for batch in loader:
            with strategy.forward_context():
                logits = strategy.model(**model_inputs(batch, device)).logits
            loss_sum += float(causal_lm_loss_sum(logits, batch["labels"].to(device)))
            tokens += batch["num_loss_tokens"]
            stop.check("evaluation")
            progress.advance()
    loss_sum, tokens = dist.all_reduce(loss_sum, device), dist.all_reduce(tokens, device)
    return {"eval_loss": loss_sum / max(tokens, 1.0), "eval_loss_examples": len(examples)}


def task_accuracy(strategy, tokenizer, examples, *, task, template: str, max_new_tokens: int, batch_size: int,
                  rank: int, world: int, stop: StopCheck, label: str, layerwise: bool = False) -> dict:
    """Greedy answers to every rank's share of the prompts, gathered and scored by the task. `layerwise`: the model
    stays sharded and every rank runs the same batches in step (a rank short of prompts repeats its last one and
    drops the answer)."""
    mine = list(range(rank, len(examples), world))
    prompts = [format_prompt(tokenizer, examples[i].messages, template) for i in mine]
    if layerwise:
        filler = prompts[-1:] or [format_prompt(tokenizer, examples[0].messages, template)]
        prompts += filler * (math.ceil(len(examples) / world) - len(prompts))
    resolved = resolve_template(tokenizer, template)
    plain = resolved == "plain"  # tokenized as in training: BOS only on plain prompts
    with (Progress(f"{label}: generation ({len(examples)} prompts)", math.ceil(len(prompts) / batch_size),
                   unit="batches", enabled=rank == 0) as progress,
          strategy.generation_context(gather=not layerwise) as gen_model, strategy.forward_context()):
        texts = greedy_generate(gen_model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                add_special_tokens=plain, stop=stop_strings(resolved),
                                should_stop=stop.agree if layerwise else stop.local, on_batch=progress.advance,
                                synced=layerwise)
    stop.check("evaluation")  # a rank that stopped generating early has incomplete outputs
    gathered = dist.all_gather_objects(list(zip(mine, texts[:len(mine)], strict=True)))
    by_index = dict(pair for part in gathered for pair in part)
    outputs = [by_index[i] for i in range(len(examples))]
    out = task.score(outputs, examples)
    out["predictions"] = predictions(examples, outputs, out.pop("per_example"))
    out["samples"] = [{"question": p["prompt"], "output": p["output"]} for p in out["predictions"][:SAMPLES]]
    return out


def generates_layerwise(gather: str, strategy, device: torch.device) -> bool:
    """eval.gather resolved for this run: whether a sharded model generates layer by layer (see EvalConfig).
    auto: layer by layer on a GPU whose free memory would not hold the full weights with a fifth to spare (the
    KV cache and the prefill's activations come on top)."""
    if not strategy.shards_parameters or gather == "full":
        return False
    if gather == "layerwise":
        return True
    if device.type != "cuda":
        return False  # host memory: the gathered copy is the model's size again, as for DDP
    free, _ = torch.cuda.mem_get_info(device)
    return full_weight_bytes(strategy.model) > settings.GATHER_SHARE * free


def full_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter at full size, however it is sharded (DTensor numel is global; ZeRO-3 ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def predictions(examples, outputs: list[str], per_example: list[dict]) -> list[dict]:
    """One row per scored question: its index in the test split, the question, the output and how it scored."""
    return [{"index": i, "prompt": e.messages[-1]["content"], "output": o, **scored}
            for i, (e, o, scored) in enumerate(zip(examples, outputs, per_example, strict=True))]
