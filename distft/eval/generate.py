"""Batched greedy generation for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    add_special_tokens: bool = False,
    stop: Sequence[str] = (),
    should_stop: Callable[[], object] | None = None,
    on_batch: Callable[[], None] | None = None,
    synced: bool = False,
) -> list[str]:
    """Greedily complete each prompt and return only the new text, in the order of ``prompts``.

    Prompts are sorted by length so each batch carries little padding, and padded on the left so
    every row's last token sits at the end and generation continues from it. The model (a plain
    Hugging Face model or a ``peft`` wrapper) runs in eval mode; each module's previous train/eval
    mode and the tokenizer's padding settings are restored afterwards.

    Args:
        model: a causal LM with ``generate``; inputs go to the device of its parameters.
        tokenizer: the model's tokenizer; without a pad token, EOS is used for padding.
        prompts: fully formatted prompts (chat template already applied), hence no special tokens
            are added by default.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call.
        add_special_tokens: whether the tokenizer adds BOS/EOS-style tokens to each prompt.
        stop: strings that end an answer besides EOS (``distft.data.stop_strings``): a row stops generating once
            its text contains one, and the text from the first one on is dropped.
        should_stop: asked before each batch; when it answers truthy, generation ends there and the prompts
            not reached keep an empty output (the caller decides what a stopped evaluation means).
        on_batch: called after each batch (progress).
        synced: the model is sharded and its forwards are collective: every rank must pass the same number of
            prompts (so the same number of batches) and `should_stop` must be collective; ranks that finish a batch
            early keep stepping until all have (transformers' `synced_gpus`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])

    modes = {module: module.training for module in model.modules()}
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    outputs = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                break
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            )
            input_ids = batch["input_ids"].to(device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # gathered weights: each rank decodes alone, never syncing per token; sharded: in step
                synced_gpus=synced,
                **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
            )
            texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
            texts = [truncate_at(text, stop) for text in texts]
            for i, text in zip(rows, texts, strict=True):
                outputs[i] = text
            if on_batch is not None:
                on_batch()
    finally:
        for module, training in modes.items():
            module.training = training
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None
    return outputs


def truncate_at(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
