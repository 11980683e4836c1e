"""Strategies by name. The training loop only ever calls the `Strategy` interface."""

import torch

from distft.strategy.base import Strategy
from distft.strategy.ddp import DDPStrategy

STRATEGIES = {"ddp": DDPStrategy}


def build_strategy(name: str, *, device: torch.device, precision: str, find_unused_parameters: bool = False) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](device=device, precision=precision, find_unused_parameters=find_unused_parameters)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
