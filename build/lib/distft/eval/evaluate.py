"""Evaluation inside a training run: eval loss on answer tokens and (GSM8K) greedy-decoding accuracy, with every rank
on a disjoint shard of the test split."""

import torch

from distft import dist
from distft.data import ShardedBatches, encode_examples, format_prompt, pack_examples, unpacked_rows
from distft.eval.generate import greedy_generate
from distft.eval.gsm8k import gold_answer, score
from distft.loss import causal_lm_loss_sum, model_inputs


@torch.no_grad()
def evaluate(strategy, tokenizer, examples, *, template: str, seq_len: int, packing: bool, micro_batch_size: int,
             loss_examples: int | None, gsm8k_examples: int | None, max_new_tokens: int, batch_size: int,
             rank: int, world: int, device: torch.device) -> dict:
    """Eval loss over the first `loss_examples` examples and GSM8K accuracy over the first `gsm8k_examples` (None:
    all of them; 0: no generation).

    Every rank runs the same number of loss batches (shards are padded), so sharded models can run their
    collectives; generation runs on the model the strategy hands out for it.
    """
    model = strategy.model
    was_training = model.training
    model.eval()
    out: dict = {}
    loss_examples = examples[:loss_examples] if loss_examples is not None else examples
    encoded, _ = encode_examples(tokenizer, loss_examples, template, seq_len)
    rows = pack_examples(encoded, seq_len, tokenizer.pad_token_id) if packing else unpacked_rows(encoded)
    loader = ShardedBatches(rows, micro_batch_size=micro_batch_size, rank=rank, world_size=world,
                            seed=0, shuffle=False, pad_id=tokenizer.pad_token_id, pad_to_equal=True)
    loss_sum = tokens = 0.0
    for batch in loader:
        with strategy.forward_context():
            logits = model(**model_inputs(batch, device)).logits
        loss_sum += float(causal_lm_loss_sum(logits, batch["labels"].to(device)))
        tokens += batch["num_loss_tokens"]
    loss_sum, tokens = dist.all_reduce(loss_sum, device), dist.all_reduce(tokens, device)
    out["eval_loss"] = loss_sum / max(tokens, 1.0)
    out["eval_loss_examples"] = len(loss_examples)

    if gsm8k_examples != 0:
        gen_examples = examples[:gsm8k_examples] if gsm8k_examples is not None else examples
        mine = list(range(rank, len(gen_examples), world))
        prompts = [format_prompt(tokenizer, gen_examples[i].messages, template) for i in mine]
        with strategy.generation_context() as gen_model, strategy.forward_context():
            texts = greedy_generate(gen_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
        gathered = dist.all_gather_objects(list(zip(mine, texts, strict=True)))
        by_index = dict(pair for part in gathered for pair in part)
        predictions = [by_index[i] for i in range(len(gen_examples))]
        out.update(score(predictions, [gold_answer(e.response) for e in gen_examples]))
        out["samples"] = [{"question": gen_examples[i].messages[-1]["content"], "output": predictions[i]}
                          for i in range(min(3, len(gen_examples)))]
    model.train(was_training)
    return out
