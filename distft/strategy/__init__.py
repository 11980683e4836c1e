"""Strategies by name. The training loop only ever calls the `Strategy` interface."""

import torch

from distft.strategy.base import Strategy
from distft.strategy.ddp import DDPStrategy

STRATEGIES = {"ddp": DDPStrategy}


def build_strategy(name: str, *, device: torch.device, precision: str, micro_batch_size: int, grad_accum: int,
                   options: dict) -> Strategy:
    """`options` are the `strategy.*` config keys; each strategy takes the ones it understands."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    options = {k: v for k, v in options.items() if k != "name"}
    return STRATEGIES[name](device=device, precision=precision, micro_batch_size=micro_batch_size,
                            grad_accum=grad_accum, **options)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
