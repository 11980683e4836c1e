"""Every shipped experiment composes and validates; bad overrides fail early with messages that name the fix."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from distft.config import validate_cluster, validate_config
from distft.errors import ConfigError
from tests.conftest import CONF_DIR, REPO, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_the_contract_experiments_exist():
    assert {"gsm8k_lora", "gsm8k_full", "gsm8k_qlora"} <= set(EXPERIMENTS)
    assert {"llama2_7b", "llama2_13b", "llama2_70b", "smollm2_135m", "tiny_llama"} <= set(MODELS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("hardware", [[], ["model=smollm2_135m", "hardware=cpu"]])
def test_experiments_compose_and_validate(experiment, hardware, data_dir):
    overrides = [f"+experiment={experiment}", f"data.path={data_dir}", *hardware]
    cfg = compose_cfg(overrides)
    validate_config(cfg)
    if cfg.compare.enabled:  # a comparison: every arm composes and validates too
        from distft.compare import compose_arms

        assert [a.method.name for a in compose_arms(cfg, overrides).values()] == ["full", "lora", "qlora"]
    else:
        assert cfg.method.name == {"lora_sweep": "lora"}.get(experiment, experiment.split("_", 1)[1])
    if hardware:
        assert cfg.model.source == "embedded" and not cfg.scaling.use_gpu and cfg.trainer.max_steps


def test_default_experiment_is_llama2_7b_on_gpu_workers():
    cfg = compose_cfg(["+experiment=gsm8k_lora"])
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf"
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8 and cfg.trainer.precision == "bf16"


@pytest.mark.parametrize("model", ["llama2_13b", "llama2_70b"])
def test_bigger_models_select_by_name(model):
    cfg = compose_cfg(["+experiment=gsm8k_lora", f"model={model}"])
    assert cfg.model.path == f"meta-llama/Llama-2-{model.split('_')[1]}-hf"


def test_contract_overrides_apply(tmp_path):
    cfg = compose_cfg(["+experiment=gsm8k_lora", "trainer.max_steps=20", "scaling.num_workers=2",
                       f"data.path={tmp_path}", "run.name=NAME", f"run.storage_path={tmp_path}"])
    assert (cfg.trainer.max_steps, cfg.scaling.num_workers, cfg.run.name) == (20, 2, "NAME")
    assert cfg.data.path == str(tmp_path)


def test_typo_in_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["+experiment=gsm8k_lora", "trainer.max_stpes=10"])
    assert "max_stpes" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg(["+experiment=gsm8k_lora", "trainer.max_steps=ten"])
    assert "max_steps" in str(e.value) + str(e.value.__cause__)


def test_unknown_group_option_lists_valid_ones():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["+experiment=gsm8k_lora", "method=lorra"])
    assert "lora" in str(e.value) and "qlora" in str(e.value)


def test_unknown_key_in_a_yaml_file_is_rejected(tmp_path):
    # Group files merge into the typed schema too: a typo inside a user's YAML is a compose error, not ignored.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "+experiment=typo"])
    assert "learning_rate" in str(e.value) + str(e.value.__cause__)


def test_validation_reports_every_problem_at_once(data_dir):
    cfg = compose_cfg(["+experiment=gsm8k_qlora", "model=smollm2_135m", "hardware=cpu", f"data.path={data_dir}",
                       "model.supports_4bit=false", "trainer.global_batch_size=5", "trainer.precision=bf16"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    problems = e.value.problems
    assert len(problems) == 3
    text = str(e.value)
    assert "method=qlora" in text and "method=lora" in text  # the cause and the alternative
    assert "trainer.global_batch_size=4 or 6" in text  # the nearest valid batch sizes
    assert "trainer.precision=fp32" in text


def test_missing_data_path_is_refused_on_the_driver_and_left_to_the_workers_on_a_cluster(tmp_path):
    from distft.precheck import check_inputs
    from tests.conftest import tiny_model_dir

    cfg = compose_cfg(["+experiment=gsm8k_lora", "model=tiny_llama", f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="data.path=.*does not exist"):
        check_inputs(cfg, tiny_model_dir(), joins_cluster=False)
    checked = check_inputs(cfg, tiny_model_dir(), joins_cluster=True)  # node-local data on a cluster this joins
    assert checked.train is None and checked.notes == [f"data.path={tmp_path / 'nope'} is not readable on this machine (node-local?): checked on the "
                     "workers"]


def test_gpus_requested_on_a_cpu_cluster_suggests_the_cpu_run():
    cfg = compose_cfg(["+experiment=gsm8k_lora"])
    with pytest.raises(ConfigError) as e:
        validate_cluster(cfg, {"CPU": 2, "GPU": 0})
    assert "8 GPUs" in str(e.value) and "model=smollm2_135m hardware=cpu" in str(e.value)


def test_cli_prints_composed_config_without_running():
    out = subprocess.run([sys.executable, "-m", "distft.train", "+experiment=gsm8k_lora", "model=smollm2_135m",
                          "hardware=cpu", "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: smollm2_135m" in out.stdout and "num_workers: 2" in out.stdout


def test_cli_refuses_gpu_run_on_cpu_machine_without_traceback(tmp_path, data_dir):
    out = subprocess.run([sys.executable, "-m", "distft.train", "+experiment=gsm8k_lora", f"data.path={data_dir}",
                          f"run.storage_path={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert "model=smollm2_135m hardware=cpu" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "gsm8k_lora-llama2_7b-ddp" / "config.yaml").exists()  # no run was started


def test_fp16_is_refused_with_its_reason_and_the_precisions_that_work(data_dir):
    cfg = compose_cfg(["+experiment=gsm8k_lora", "model=smollm2_135m", "hardware=cpu", f"data.path={data_dir}",
                       "trainer.precision=fp16"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    [problem] = [p for p in e.value.problems if "fp16" in p]
    assert "loss scaling" in problem and "trainer.precision=bf16" in problem and "fp32" in problem


def test_flash_attention_with_packed_multi_row_batches_is_refused_on_the_gpu_preset():
    """GPU_REVIEW #6: FA2 would let the examples of a packed row attend to each other with micro-batches of >1 row."""
    from distft.config.validate import attention_problems

    gpu = ["+experiment=gsm8k_lora", "model.attn_implementation=flash_attention_2", "trainer.precision=bf16"]
    problems = attention_problems(compose_cfg([*gpu, "trainer.micro_batch_size=4"]))
    assert len(problems) == 1 and "trainer.micro_batch_size=1" in problems[0] and "data.packing=false" in problems[0]
    assert attention_problems(compose_cfg([*gpu, "trainer.micro_batch_size=1"])) == []
    assert attention_problems(compose_cfg([*gpu, "trainer.micro_batch_size=4", "data.packing=false"])) == []
    cpu = attention_problems(compose_cfg(["+experiment=gsm8k_lora", "hardware=cpu", "trainer.micro_batch_size=1",
                                          "model.attn_implementation=flash_attention_2"]))
    assert any("needs CUDA workers" in p for p in cpu) and any("trainer.precision=bf16" in p for p in cpu)
    assert attention_problems(compose_cfg(["+experiment=gsm8k_lora"])) == []  # sdpa: packing is kept apart


@pytest.mark.parametrize("preset,memory,tflops", [("a100_40gb_8x", 40, 312), ("a100_80gb_8x", 80, 312),
                                                  ("h100_8x", 80, 989.4), ("gpu_8x", 80, 989.4)])
def test_gpu_presets_carry_their_gpus_memory_and_peak(preset, memory, tflops):
    from distft.plan import plan_config

    cfg = compose_cfg(["+experiment=gsm8k_lora", f"hardware={preset}"])
    assert (cfg.hardware.name, cfg.hardware.gpu_memory_gb, cfg.hardware.peak_tflops) == (preset, memory, tflops)
    assert cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu and cfg.trainer.precision == "bf16"
    validate_config(cfg, installed=False)
    plan = plan_config(cfg)
    assert plan.capacity_bytes == memory * 2**30 and plan.fits  # Llama-2-7B LoRA fits every one of them


def test_bitsandbytes_optimizers_are_refused_where_the_optimizer_sees_shards(data_dir):
    base = ["+experiment=gsm8k_qlora", "model=smollm2_135m", "hardware=cpu", f"data.path={data_dir}"]
    validate_config(compose_cfg([*base, "strategy=ddp", "trainer.optimizer=paged_adamw_8bit"]))
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg([*base, "strategy=fsdp", "trainer.optimizer=paged_adamw_8bit"]))
    assert "strategy=ddp" in str(e.value) and "trainer.optimizer=adamw" in str(e.value)
    with pytest.raises(ConfigError, match="trainer.optimizer=sgd is not one of adamw, adamw_8bit"):
        validate_config(compose_cfg([*base, "trainer.optimizer=sgd"]))
