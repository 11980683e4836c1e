"""Strategies by name. The training loop only ever calls the `Strategy` interface.

Implementations are imported on first use, so DeepSpeed is only imported by runs that choose it.
"""

import importlib

import torch

from distft.strategy.base import Sharding, Strategy

# name -> "module:Class". Presets in conf/strategy/<name>.yaml set each one's options (ZeRO stage, offload, ...).
STRATEGIES = {
    "ddp": "distft.strategy.ddp:DDPStrategy",
    "zero1": "distft.strategy.deepspeed:DeepSpeedStrategy",
    "zero2": "distft.strategy.deepspeed:DeepSpeedStrategy",
    "zero3": "distft.strategy.deepspeed:DeepSpeedStrategy",
    "zero3_offload": "distft.strategy.deepspeed:DeepSpeedStrategy",
    "fsdp": "distft.strategy.fsdp:FSDPStrategy",
    "fsdp_offload": "distft.strategy.fsdp:FSDPStrategy",
}


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def strategy_problems(name: str, *, method: str, precision: str, use_gpu: bool, options: dict,
                      quant_storage: str | None = None) -> list[str]:
    """Combinations this strategy cannot run, each with the reason and a working alternative (checked before
    the cluster starts)."""
    return strategy_class(name).config_problems(method=method, precision=precision, use_gpu=use_gpu,
                                                options=options, quant_storage=quant_storage)


def strategy_sharding(name: str, options: dict) -> Sharding:
    """What strategy `name` with these `strategy.*` options shards and offloads."""
    return strategy_class(name).sharding(options)


def build_strategy(name: str, *, device: torch.device, precision: str, micro_batch_size: int, grad_accum: int,
                   options: dict) -> Strategy:
    """`options` are the `strategy.*` config keys; each strategy takes the ones it understands."""
    options = {k: v for k, v in options.items() if k != "name"}
    return strategy_class(name)(device=device, precision=precision, micro_batch_size=micro_batch_size,
                                grad_accum=grad_accum, **options)


__all__ = ["STRATEGIES", "Sharding", "Strategy", "build_strategy", "strategy_class", "strategy_problems",
           "strategy_sharding"]
