"""The optimizer and learning-rate schedule every strategy trains with (strategies receive these builders)."""

import torch

from distft.settings import BNB_OPTIMIZERS


def build_optimizer(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, name: str = "adamw") -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    import bitsandbytes as bnb

    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, warmup: int, total: int,
                    min_lr_ratio: float):
    """Linear warm-up over `warmup` steps, then `schedule` (cosine down to `min_lr_ratio`, linear, constant)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    kwargs = {"min_lr_rate": min_lr_ratio} if schedule == "cosine" else None
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=kwargs)
