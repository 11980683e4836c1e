"""launch/ and distft.launch: the cluster files parse and say what they must; the submit wrapper builds the job it
should; the Ray trainer gets the process-group backend, timeout and environment a GPU cluster needs."""

import importlib.util
import subprocess

import yaml

from tests.conftest import REPO, compose_cfg

LAUNCH = REPO / "launch"


def _load_submit():
    spec = importlib.util.spec_from_file_location("distft_submit", LAUNCH / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_launcher_yaml_passes_rays_own_schema_and_uses_the_image():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "ray_cluster_aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises on unknown or missing keys
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].endswith("distft:gpu")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all("IamInstanceProfile" in t["node_config"] for t in workers)  # S3 checkpoints
    assert any("--head" in c and "--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])


def test_kuberay_rayjob_runs_the_training_command_on_the_image():
    job = yaml.safe_load((LAUNCH / "kuberay_rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m distft.train +experiment=")
    assert "run.storage_path=s3://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]
    cluster = spec["rayClusterSpec"]
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        images += [c["image"] for c in pod["containers"]]
        assert pod["terminationGracePeriodSeconds"] >= 60  # time to checkpoint after SIGTERM
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in pod["containers"])
    assert images and all(i.endswith("distft:gpu") for i in images)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_slurm_script_is_valid_bash_and_brings_up_ray_on_every_node():
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], check=True)
    text = (LAUNCH / "slurm.sbatch").read_text()
    for needle in ("scontrol show hostnames", "ray start --head", 'ray start --address="$RAY_ADDRESS"',
                   "python -m distft.train \"$@\"", "#SBATCH --signal=B:TERM@", "#SBATCH --requeue",
                   "kill -TERM $DRIVER"):
        assert needle in text, needle


def test_submit_builds_the_job_from_the_repo_with_pass_through_env():
    submit = _load_submit()
    args = submit.parse_args(["--address", "http://head:8265", "--env", "A=1", "--",
                              "+experiment=gsm8k_lora", "run.name=x y"])
    assert args.address == "http://head:8265" and args.train_args == ["+experiment=gsm8k_lora", "run.name=x y"]
    assert submit.entrypoint(args.train_args) == "python -m distft.train +experiment=gsm8k_lora 'run.name=x y'"
    env = submit.build_runtime_env(working_dir=REPO, env={"A": "1"}, stop_grace_s=120,
                                   environ={"WANDB_API_KEY": "k", "HF_TOKEN": "t", "UNRELATED": "u"})
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert env["env_vars"] == {"WANDB_API_KEY": "k", "HF_TOKEN": "t", "RAY_JOB_STOP_WAIT_TIME_S": "120", "A": "1"}


def test_docker_images_install_what_a_cluster_node_needs():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"ray[default,train]' in pyproject  # the dashboard and job server run on cluster images
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (REPO / "docker" / name).read_text()
        assert 'pip install -c /tmp/torch-constraint.txt -e ".[all]"' in text, name
    extras = pyproject.split("[project.optional-dependencies]")[1]
    for package in ("deepspeed", "bitsandbytes"):
        assert package in extras
    makefile = (REPO / "Makefile").read_text()
    assert "docker build -f docker/Dockerfile -t" in makefile and "docker build -f docker/Dockerfile.cpu -t" in makefile


def test_fsdp_offload_on_gpus_gets_a_cpu_backend_beside_nccl():
    """GPU_REVIEW #4: with CPUOffloadPolicy the gradients are CPU tensors, and clipping all-reduces them."""
    from distft.launch import torch_backend

    assert torch_backend(compose_cfg(["+experiment=gsm8k_full", "strategy=fsdp_offload"])) == "cuda:nccl,cpu:gloo"
    assert torch_backend(compose_cfg(["+experiment=gsm8k_full", "strategy=fsdp"])) is None  # Ray's NCCL
    assert torch_backend(compose_cfg(["+experiment=gsm8k_full", "strategy=zero3_offload"])) is None
    assert torch_backend(compose_cfg(["+experiment=gsm8k_full", "strategy=fsdp_offload", "hardware=cpu"])) is None


def test_the_trainer_gets_the_backend_and_the_presets_collective_timeout(tmp_path):
    """GPU_REVIEW #9: ranks wait in collectives while rank 0 exports alone; the GPU presets give them an hour."""
    from distft.launch import build_trainer

    for hardware, backend, timeout in (("h100_8x", "cuda:nccl,cpu:gloo", 3600), ("cpu", "gloo", 1800)):  # None: Ray picks gloo on CPU
        cfg = compose_cfg(["+experiment=gsm8k_full", "strategy=fsdp_offload", f"hardware={hardware}",
                           f"run.storage_path={tmp_path}"])
        config = build_trainer(cfg, run_dir=tmp_path / "run", model_dir=str(tmp_path)).backend_config
        assert (config.backend, config.timeout_s) == (backend, timeout)


def test_nccl_and_efa_settings_on_the_driver_reach_the_workers(tmp_path, monkeypatch):
    from distft.launch import build_trainer

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens5")
    monkeypatch.setenv("FI_PROVIDER", "efa")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    cfg = compose_cfg(["+experiment=gsm8k_lora", "hardware=h100_8x", f"run.storage_path={tmp_path}"])
    env = build_trainer(cfg, run_dir=tmp_path / "run", model_dir=str(tmp_path)).run_config.worker_runtime_env
    assert {"NCCL_SOCKET_IFNAME": "ens5", "FI_PROVIDER": "efa", "HF_TOKEN": "hf_x"}.items() <= env["env_vars"].items()
