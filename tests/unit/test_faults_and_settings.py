"""Small pieces the recipe, planner and failure tests build on: derived settings, when checkpoints are saved, and
the fault injection hooks."""

import math
import signal

import pytest

from distft import settings
from distft.checkpoint import Checkpointer
from distft.faults import FAULT_ENV, Faults


def test_batch_arithmetic_and_its_refusal_name_the_nearest_sizes():
    assert settings.grad_accum(global_batch_size=64, micro_batch_size=4, world=8) == 2
    assert settings.batch_problem(global_batch_size=64, micro_batch_size=4, world=8) is None
    problem = settings.batch_problem(global_batch_size=5, micro_batch_size=1, world=2)
    assert "trainer.global_batch_size=5" in problem and "trainer.global_batch_size=4 or 6" in problem


def test_lr_steps_and_warmup_fall_back_to_their_defaults():
    assert settings.learning_rate(lr=None, default_lr=2e-4) == 2e-4
    assert settings.learning_rate(lr=1e-3, default_lr=2e-4) == 1e-3
    assert settings.max_steps(max_steps=None, epochs=3, steps_per_epoch=10) == 30
    assert settings.max_steps(max_steps=7, epochs=3, steps_per_epoch=10) == 7
    assert settings.warmup_steps(warmup_steps=None, warmup_ratio=0.03, total_steps=100) == 3
    assert settings.warmup_steps(warmup_steps=0, warmup_ratio=0.03, total_steps=100) == 0


def test_load_dtype_keeps_fp32_masters_for_full_and_the_compute_dtype_for_4bit_bases():
    assert settings.load_dtype("full", precision="bf16") == "fp32"
    assert settings.load_dtype("lora", precision="bf16", compute="fp32") == "bf16"
    assert settings.load_dtype("qlora", precision="bf16", compute="fp32") == "fp32"
    assert settings.load_dtype("qlora", precision="bf16") == "bf16"


def test_rank0_load_defaults_on_only_where_parameters_are_sharded_and_not_4bit():
    assert settings.rank0_load(None, shards_parameters=True, quantized=False)
    assert not settings.rank0_load(False, shards_parameters=True, quantized=False)
    assert not settings.rank0_load(None, shards_parameters=True, quantized=True)
    assert not settings.rank0_load(True, shards_parameters=False, quantized=False)


def test_checkpoints_are_saved_on_schedule_at_the_end_and_when_asked():
    ckpt = Checkpointer(None, rank=0, world=1, every=4, max_steps=10, info={}, report=lambda *a: None)
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [4, 8, 10]
    assert ckpt.should_save(3, now=True)


def test_a_fault_applies_to_its_rank_and_step_only(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "3:1:nan")
    assert Faults(0, tmp_path).at_step(3, 1.5) == 1.5  # another rank
    faults = Faults(1, tmp_path)
    assert faults.at_step(2, 1.5) == 1.5
    assert math.isnan(faults.at_step(3, 1.5)) and math.isnan(faults.at_step(3, 1.5))  # NaN on every attempt
    monkeypatch.delenv(FAULT_ENV)
    assert Faults(1, tmp_path).step is None


def test_sigterm_fault_signals_once_and_leaves_a_marker(tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        faults = Faults(0, tmp_path, spec="2::sigterm")  # rank defaults to 0
        assert faults.at_step(2, 0.5) == 0.5
        assert received == [signal.SIGTERM] and (tmp_path / ".fault_injected_step2_rank0").exists()
        faults.at_step(2, 0.5)  # a restarted attempt passes the step
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("spec", ["", None])
def test_no_fault_without_a_spec(spec, tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert Faults(0, tmp_path, spec=spec).at_step(1, 2.0) == 2.0
