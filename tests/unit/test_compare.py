"""The compare experiment's arms: composed by Hydra from the command line, validated together, sized to the cluster."""

import pytest

from distft.compare import compose_arms, concurrency
from distft.errors import ConfigError
from tests.conftest import compose_cfg

BASE = ["+experiment=gsm8k_compare", "model=tiny_llama", "hardware=cpu", "trainer.max_steps=5",
        "run.storage_path=/tmp/distft-compare-test"]


def arms_for(extra: list[str]):
    overrides = BASE + extra
    return compose_arms(compose_cfg(overrides), overrides)


def test_arms_share_everything_but_method_and_lr():
    arms = arms_for(["compare.arms.full.lr=2e-5", "trainer.seed=7"])
    assert list(arms) == ["full", "lora", "qlora"]
    assert {n: (a.method.name, a.trainer.lr) for n, a in arms.items()} == {
        "full": ("full", 2e-5), "lora": ("lora", 1e-4), "qlora": ("qlora", 1e-4)}
    for name, arm in arms.items():
        assert arm.trainer.seed == 7 and arm.trainer.max_steps == 5 and arm.model.name == "tiny_llama"
        assert arm.compare.enabled is False
        assert (arm.run.storage_path, arm.run.name) == ("/tmp/distft-compare-test/gsm8k_compare-tiny_llama-ddp", name)
        assert arm.logger.group == "gsm8k_compare-tiny_llama-ddp"
    # the method group resolved as on the command line: QLoRA's own defaults came with it
    assert arms["qlora"].method.quant_type == "nf4"


def test_arm_overrides_disable_and_add_arms():
    arms = arms_for(["compare.arms.qlora.enabled=false", "compare.arms.lora.overrides=['strategy=zero3']",
                     "+compare.arms={lora_r4:{method:lora,lr:3e-4,overrides:['method.lora_r=4']}}"])
    assert list(arms) == ["full", "lora", "lora_r4"]
    assert arms["lora"].strategy.name == "zero3" and arms["full"].strategy.name == "fsdp"  # full: sharded by default
    assert arms["lora_r4"].method.lora_r == 4 and arms["lora_r4"].trainer.lr == 3e-4


def test_every_arm_is_validated_before_any_starts():
    with pytest.raises(ConfigError) as err:
        arms_for(["compare.arms.full.overrides=['trainer.global_batch_size=3']",
                  "compare.arms.qlora.overrides=['model.supports_4bit=false']", "compare.arms.lora.method=nope"])
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("compare.arms.full: trainer.global_batch_size=3")
    assert problems[1].startswith("compare.arms.lora:") and "nope" in problems[1]
    assert problems[2].startswith("compare.arms.qlora: method=qlora") and "method=lora" in problems[2]


def test_schema_rejects_unknown_arm_keys():
    with pytest.raises(Exception, match="lrr"):
        compose_cfg(BASE + ["compare.arms.full.lrr=1e-5"])


def test_concurrency_counts_arms_that_fit():
    arms = arms_for([])  # 2 workers x 1 CPU each
    assert concurrency(arms, {"CPU": 2}, None) == 1
    assert concurrency(arms, {"CPU": 4}, None) == 2
    assert concurrency(arms, {"CPU": 64}, None) == 3
    assert concurrency(arms, {"CPU": 64}, 2) == 2
    assert concurrency(arms, {"CPU": 1}, None) == 1  # never zero: the arm waits for resources
