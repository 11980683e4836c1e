"""The training objective: summed next-token cross-entropy over answer tokens, and the model inputs of a batch."""

import torch
import torch.nn.functional as F


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of next-token predictions over answer tokens (labels != -100)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def model_inputs(batch: dict, device: torch.device) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
              "use_cache": False}
    # Packed rows come without a mask: transformers derives a block-diagonal causal mask from position_ids.
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs
