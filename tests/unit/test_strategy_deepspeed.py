"""DeepSpeed strategy: the generated DeepSpeed config and the combinations refused before a cluster starts.

Pure functions only: nothing here starts a process (one test parses the generated config with DeepSpeed's parser).
"""

import pytest

from distft.config import validate_config
from distft.errors import ConfigError
from distft.strategy import strategy_problems
from distft.strategy.deepspeed import DeepSpeedStrategy, build_config, deep_merge
from tests.conftest import compose_cfg

ZERO_PRESETS = ["zero1", "zero2", "zero3", "zero3_offload"]


def _problems(**options) -> list[str]:
    return DeepSpeedStrategy.config_problems(method="full", precision="fp32", use_gpu=False,
                                             options={"name": "zero3", "zero_stage": 3, **options})


@pytest.mark.parametrize("strategy", ZERO_PRESETS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_shipped_presets_validate_on_cpu_and_gpu(strategy, method, data_dir):
    for hardware in (["model=tiny_llama", "hardware=cpu"], []):
        cfg = compose_cfg([f"+experiment=gsm8k_{method}", f"strategy={strategy}", f"data.path={data_dir}",
                           *hardware])
        validate_config(cfg)


def test_config_follows_the_trainer_batch_arithmetic_and_precision():
    cfg = build_config(zero_stage=2, precision="fp32", micro_batch_size=4, grad_accum=8)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 8
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_allow_untested_optimizer"] is True  # the client optimizer is torch AdamW
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the recipe builds both
    assert build_config(zero_stage=3, precision="bf16", micro_batch_size=1, grad_accum=1)["bf16"] == {"enabled": True}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32_and_fp32_runs_are_unchanged(stage):
    """As FSDP2's MixedPrecisionPolicy(reduce_dtype=fp32): without these keys both default to bf16 (GPU_REVIEW #8)."""
    bf16 = build_config(zero_stage=stage, precision="bf16", micro_batch_size=2, grad_accum=4)
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"} and bf16["communication_data_type"] == "fp32"
    fp32 = build_config(zero_stage=stage, precision="fp32", micro_batch_size=2, grad_accum=4)
    assert set(fp32) == set(bf16) - {"data_types", "communication_data_type"}
    assert all(bf16[k] == v for k, v in fp32.items() if k != "bf16")
    # DeepSpeed's own parser reads them (and an explicit strategy.deepspeed value still wins)
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    torch = pytest.importorskip("torch")
    parsed = ds_config.DeepSpeedConfig(bf16)
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    plain = ds_config.DeepSpeedConfig(fp32)
    assert plain.grad_accum_dtype is None and plain.communication_data_type is None  # fp32 model dtype: fp32
    mine = build_config(zero_stage=stage, precision="bf16", micro_batch_size=2, grad_accum=4,
                        extra={"communication_data_type": "bf16"})
    assert mine["communication_data_type"] == "bf16" and mine["data_types"] == {"grad_accum_dtype": "fp32"}


def test_offload_sections_follow_the_options():
    cfg = build_config(zero_stage=3, precision="fp32", micro_batch_size=1, grad_accum=1, offload_optimizer=True,
                       offload_params=True, pin_memory=True)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_extra_deepspeed_keys_merge_deeply_over_the_generated_config():
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "communication_data_type": "fp32"}
    cfg = build_config(zero_stage=3, precision="fp32", micro_batch_size=1, grad_accum=2, extra=extra)
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}  # stage kept
    assert cfg["communication_data_type"] == "fp32"
    base = {"a": {"b": 1}}
    assert deep_merge(base, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}} and base == {"a": {"b": 1}}


def test_hydra_override_of_strategy_deepspeed_reaches_the_config():
    cfg = compose_cfg(["+experiment=gsm8k_lora", "strategy=zero3",
                       "+strategy.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    strategy = DeepSpeedStrategy(device=__import__("torch").device("cpu"), precision="fp32", micro_batch_size=1,
                                 grad_accum=1, **{k: v for k, v in cfg.strategy.items() if k != "name"})
    assert strategy.config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}


def test_presets_have_no_problems():
    for options in ({"zero_stage": 1}, {"zero_stage": 2}, {"zero_stage": 3},
                    {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
                    {"zero_stage": 2, "offload_optimizer": True}):
        for method in ("full", "lora", "qlora"):
            for use_gpu, precision in ((False, "fp32"), (True, "bf16")):
                assert DeepSpeedStrategy.config_problems(method=method, precision=precision, use_gpu=use_gpu,
                                                         options=options) == []


def test_qlora_under_zero3_in_bf16_stores_the_4bit_weights_as_bf16():
    """ZeRO-3 gathers one dtype per group: uint8 4-bit weights beside bf16 ones fail on GPUs ("expected there to be
    only one unique element"), so bf16 storage is chosen there, and another explicit storage is refused."""
    from distft.settings import run_settings

    def storage(*overrides):
        cfg = compose_cfg(["+experiment=gsm8k_qlora", *overrides])
        return run_settings(cfg, world=8).quant_storage

    assert storage("strategy=zero3") == storage("strategy=zero3_offload") == "bf16"
    assert storage("strategy=zero2") is None and storage("strategy=ddp") is None  # uint8: nothing gathers it
    assert storage("strategy=zero3", "model=tiny_llama", "hardware=cpu") is None  # fp32 on CPU, as tested there
    assert storage("strategy=zero3", "method.quant_storage=fp32") == "fp32"  # the user's choice is kept ...
    (problem,) = DeepSpeedStrategy.config_problems(method="qlora", precision="bf16", use_gpu=True,
                                                   options={"zero_stage": 3, "name": "zero3"}, quant_storage="fp32")
    assert "method.quant_storage=bf16" in problem and "strategy=zero2" in problem  # ... and refused with the fix
    for value in (None, "bf16"):
        assert DeepSpeedStrategy.config_problems(method="qlora", precision="bf16", use_gpu=True,
                                                 options={"zero_stage": 3}, quant_storage=value) == []


def test_stage_outside_one_to_three_names_the_key_and_the_presets():
    (problem,) = _problems(zero_stage=0)
    assert "strategy.zero_stage=0" in problem and "strategy=zero1, zero2 or zero3" in problem


def test_parameter_offload_below_stage_three_points_to_zero3_offload():
    (problem,) = _problems(name="zero2", zero_stage=2, offload_params=True)
    assert "strategy.offload_params=true" in problem and "strategy.zero_stage=2" in problem
    assert "strategy=zero3_offload" in problem


def test_deepspeed_keys_owned_by_the_recipe_are_refused_with_the_trainer_key_to_use():
    problems = _problems(deepspeed={"train_batch_size": 64, "gradient_clipping": 0.5, "optimizer": {"type": "Adam"},
                                    "zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert len(problems) == 3  # zero_optimization tuning is allowed
    text = "\n".join(problems)
    assert "strategy.deepspeed.train_batch_size" in text and "trainer.global_batch_size" in text
    assert "strategy.deepspeed.gradient_clipping" in text and "trainer.max_grad_norm" in text
    assert "strategy.deepspeed.optimizer" in text and "trainer.lr" in text


def test_every_problem_is_reported_through_validate_config(data_dir):
    cfg = compose_cfg(["+experiment=gsm8k_lora", "model=tiny_llama", "hardware=cpu", f"data.path={data_dir}",
                       "strategy=zero2", "strategy.offload_params=true", "+strategy.deepspeed.train_batch_size=8"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert len(e.value.problems) == 2
    assert "strategy=zero3_offload" in str(e.value) and "trainer.global_batch_size" in str(e.value)


def test_registry_routes_every_zero_preset_to_this_class():
    for name in ZERO_PRESETS:
        assert strategy_problems(name, method="lora", precision="fp32", use_gpu=False,
                                 options={"zero_stage": 3}) == []


def test_constructor_accepts_other_strategies_options_and_rejects_bad_stages():
    import torch

    s = DeepSpeedStrategy(device=torch.device("cpu"), zero_stage=1, find_unused_parameters=False,
                          reshard_after_forward=True, cpu_offload=False)
    assert s.config["zero_optimization"]["stage"] == 1
    with pytest.raises(ValueError, match="strategy.zero_stage=4"):
        DeepSpeedStrategy(device=torch.device("cpu"), zero_stage=4)
