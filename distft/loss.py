"""The training objective: summed next-token cross-entropy over answer tokens, and the model inputs of a batch."""

import torch
import torch.nn.functional as F

from distft.data.format import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of next-token predictions over answer tokens (labels != -100).

    `chunk_tokens` (trainer.loss_chunk_tokens) computes it that many positions at a time, forward and backward, so
    that besides the logits and their gradient no full-vocabulary fp32 tensor of the micro-batch exists (with a
    128k vocabulary the loss is otherwise the largest activation); chunks without an answer token are skipped. The
    gradient is the unchunked one bit for bit; the loss differs from it only by the order of float additions.
    `labels` may stay on the host: which chunks to skip is read from them without a device sync.
    """
    if not chunk_tokens:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    targets = labels[:, 1:]
    answered = (targets != IGNORE_INDEX).cpu()
    width = targets.shape[1]  # position t < width of the logits predicts target t (token t + 1)
    chunks = [(row, start, min(start + chunk_tokens, width)) for row in range(targets.shape[0])
              for start in range(0, width, chunk_tokens) if answered[row, start:start + chunk_tokens].any()]
    return _ChunkedCrossEntropy.apply(logits, targets.to(logits.device), chunks)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy summed chunk by chunk; backward recomputes each chunk's log-softmax and writes its gradient
    into one logits-sized tensor (slicing under autograd would allocate a logits-sized gradient per chunk)."""

    @staticmethod
    def forward(ctx, logits, targets, chunks):
        ctx.save_for_backward(logits, targets)
        ctx.chunks = chunks
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for row, start, end in chunks:
            total += _chunk_loss_sum(logits[row, start:end], targets[row, start:end])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, targets = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for row, start, end in ctx.chunks:
            with torch.enable_grad():
                piece = logits[row, start:end].detach().requires_grad_()
                (grad[row, start:end],) = torch.autograd.grad(_chunk_loss_sum(piece, targets[row, start:end]),
                                                              piece, grad_total)
        return grad, None, None


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def model_inputs(batch: dict, device: torch.device) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
              "use_cache": False}
    # Packed rows come without a mask: transformers derives a block-diagonal causal mask from position_ids.
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs
