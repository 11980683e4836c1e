"""The driver side of a run: check everything that can be checked here, start or join the Ray cluster, run the
recipe on Ray Train workers (`distft.worker.train_worker`) and write summary.json. Used by `python -m distft.train`
and by each arm of a comparison (`distft.compare`)."""

import json
import math
import os
import sys
import time
from pathlib import Path

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from distft import console, preemption
from distft.checkpoint import check_resume_from
from distft.config import validate_cluster, validate_config
from distft.config.validate import local_cpu_count
from distft.errors import UserError
from distft.model import cache_dir, resolve_model_dir
from distft.plan import PlanRefused, check_plan
from distft.plan.preflight import write_preflight
from distft.precheck import check_inputs, check_storage
from distft.storage import RunStorage, is_uri
from distft.summary import build_summary, write_summary
from distft.worker import train_worker

# Variables the workers need to see exactly as the driver does.
PASS_THROUGH_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE",
                    "DISTFT_FAULT_AT_STEP")
# NCCL's own settings and libfabric's (AWS EFA): set on the driver, they reach every worker
PASS_THROUGH_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_")


def launch(cfg: DictConfig) -> dict:
    """One run, start to finish: validate → prepare the model → connect to Ray → train → summary.json.
    Nothing is scheduled on the cluster until every check has passed. Returns the summary."""
    console.show_progress()
    absolute_paths(cfg)
    validate_config(cfg)
    if cfg.preflight:  # its own directory: a preflight checkpoint must never become the real run's resume point
        cfg.run.name = f"{cfg.run.name}-preflight-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = RunStorage(cfg.run.storage_path, cfg.run.name)
    run_dir = storage.local_dir  # this process writes here; for a URI it is a staging copy pushed to storage
    check_storage(cfg.run.storage_path)
    refuse_completed(storage)
    check_resume_from(cfg.run.resume_from)  # an explicit bad checkpoint fails here; the workers load a good one

    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    # A local cluster will have exactly this machine's resources: check before starting it. Inside a Ray task (compare
    # arms, sweep jobs) Ray is already up and this process may see no GPU; the cluster check below covers it.
    if not address and not ray_initialized():
        validate_cluster(cfg, local_resources(cfg))
    model_dir = resolve_model_dir(**OmegaConf.to_container(cfg.model, resolve=True))
    checked = check_inputs(cfg, model_dir, joins_cluster=bool(address) or ray_initialized())
    for note in checked.notes:
        print(f"distft: note: {note}", file=sys.stderr)
    plan = run_plan(cfg, model_dir)
    import ray

    init_ray(cfg, address)
    # the rows the check built, for the workers (distft.worker): tokenising and packing the split again on every
    # worker would cost each of them what it cost the check
    train_rows = ray.put(checked.train) if checked.train is not None else None
    validate_cluster(cfg, ray.cluster_resources())
    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_storage(storage)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    storage.push("config.yaml")

    trainer = build_trainer(cfg, run_dir=run_dir, model_dir=model_dir, storage=storage,
                            plan=plan, train_rows=train_rows)
    status, error, wall, user_error = fit(trainer, cfg)
    storage.pull("metrics.jsonl", "train_result.json")
    summary = build_summary(cfg, run_dir, status=status, error=error, wall_seconds=wall, plan=plan)
    if user_error:
        summary["error_kind"] = "user"  # a problem in the input that a worker found: the CLI exits 2
    write_summary(storage, summary)
    if cfg.preflight:
        write_preflight(run_dir, summary=summary, plan=plan, location=storage.uri if storage.remote else None)
        storage.push("preflight.json")
    return summary


def absolute_paths(cfg: DictConfig) -> None:
    """Relative paths mean the directory the command was started in (Hydra may have changed directory since)."""
    if not is_uri(cfg.run.storage_path):
        cfg.run.storage_path = str(Path(to_absolute_path(cfg.run.storage_path)))
    if cfg.run.resume_from is not None and not is_uri(cfg.run.resume_from):
        cfg.run.resume_from = str(Path(to_absolute_path(cfg.run.resume_from)))
    if cfg.data.path is not None:
        cfg.data.path = to_absolute_path(cfg.data.path)


def refuse_completed(storage: RunStorage) -> None:
    if storage.completed():
        raise UserError(
            f"run '{storage.name}' already completed ({storage.location('summary.json')}); pick a new run.name=... "
            "to start another run, or delete that directory"
        )


def fit(trainer, cfg: DictConfig) -> tuple[str, str | None, float, bool]:
    """Run the trainer with the driver's SIGTERM handler installed.
    Returns (status, error, wall seconds, whether the error is the user's to fix)."""
    import ray

    stop_actor = preemption.create_stop_actor(cfg.run.name)
    preemption.install_driver_handler(stop_actor)
    started = time.time()
    status, error, user_error = "completed", None, False
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; the summary records the cause
        status = "failed"
        found = console.user_errors(e)
        if found:  # the same message from every rank is said once; the tracebacks are in the run's logs/
            user_error, error = True, user_error_message(found)
        else:
            error = failure_message(e, max_failures=cfg.run.max_failures)
            print(f"\ndistft: training failed: {error}\n", file=sys.stderr)
    finally:
        preemption.restore_driver_handler()
        ray.kill(stop_actor)
    return status, error, time.time() - started, user_error


def user_error_message(errors: list) -> str:
    """One message per distinct problem, naming the ranks that hit it and where their tracebacks are."""
    by_message: dict[str, list] = {}
    for e in errors:
        by_message.setdefault(str(e), []).append(e)
    parts = []
    for message, same in by_message.items():
        ranks = ", ".join(str(e.rank) for e in same)
        logs = sorted({str(Path(e.log).parent) for e in same if e.log})
        parts.append(f"{message}\n(found on worker rank{'s' if len(same) > 1 else ''} {ranks}"
                     + (f"; traceback in {logs[0]}/" if logs else "") + ")")
    return "\n".join(parts)


def check_shared_storage(storage: RunStorage) -> None:
    """Multi-node runs write checkpoints from every node: a local path must be the same shared directory on all of
    them. A probe file written here must be visible from every other alive node (checked by a tiny Ray task)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if storage.remote or len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = storage.local_dir / f".distft_storage_probe_{os.getpid()}_{time.time_ns()}"
    probe.write_text("")
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        checks = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        blind = [node for node, ref in checks.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise UserError(
            f"run.storage_path={storage.storage_path} is node-local ({_mount_type(storage.local_dir)} on this node): "
            f"the Ray cluster has {len(nodes)} nodes and {', '.join(blind)} cannot see it. Multi-node runs need "
            "storage every node shares: an NFS/Lustre mount present on all nodes, or a cloud URI such as "
            "run.storage_path=s3://BUCKET/runs or gs://BUCKET/runs"
        )


def _mount_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/mounts), for error messages."""
    best, fstype = "", "unknown filesystem"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind, *_ = line.split()
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, fstype = mount, f"{kind} mounted at {mount}"
    except OSError:
        pass
    return fstype


def failure_message(error: Exception, *, max_failures: int) -> str:
    """What failed, where: the failing rank(s) and the root cause, and how many restarts were allowed."""
    from ray.train import WorkerGroupError

    retries = f"run.max_failures={max_failures} restart(s) allowed"
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        by_cause: dict[str, list[str]] = {}
        for rank, exc in sorted(error.worker_failures.items()):
            by_cause.setdefault(_root_cause(exc), []).append(str(rank))
        parts = [f"rank{'s' if len(r) > 1 else ''} {', '.join(r)}: {cause}" for cause, r in by_cause.items()]
        return f"worker {'; '.join(parts)} ({retries})"
    return f"{_root_cause(error)} ({retries})"


def _root_cause(error: Exception) -> str:
    """The innermost exception message: Ray nests the worker's error inside its own."""
    seen = console.root_cause(error)
    return f"{type(seen).__name__}: {seen}"


def run_plan(cfg: DictConfig, model_dir: str) -> dict | None:
    """The planner's per-worker memory prediction for this run (logged next to the measured peaks), checked before
    Ray starts: a run the plan says does not fit is refused (PlanRefused, naming an alternative that fits) unless
    plan.enforce=false. A planner failure never stops training."""
    try:
        prediction, refusal = check_plan(cfg, model_dir)
    except PlanRefused:
        raise
    except Exception as e:  # noqa: BLE001
        print(f"distft: warning: no memory plan for this run: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if refusal:
        print(f"distft: warning: plan.enforce=false, running anyway: {refusal}", file=sys.stderr)
    return prediction


# --- the Ray cluster --------------------------------------------------------------------------------------------

def ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def local_resources(cfg: DictConfig) -> dict:
    """What a local Ray cluster started by `init_ray` would offer."""
    import torch

    s = cfg.scaling
    return {"CPU": max(local_cpu_count(), math.ceil(s.num_workers * s.cpus_per_worker)),
            "GPU": torch.cuda.device_count()}


# A local cluster hosts this run alone, and every process Ray starts there shares the machine with the workers:
# - Ray's idle workers started for the first driver serve no one: every actor of a run has a runtime env of its own;
# - Ray Train's preemption watcher polls the node's drain state, which nothing drains here (a SIGTERM still
#   checkpoints: distft.preemption). A value the user set in the environment still wins.
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

_STARTED_LOCAL: list[bool] = []  # non-empty once init_ray started a local cluster in this process


def init_ray(cfg: DictConfig, address: str | None) -> None:
    """Join the cluster at `address` (run.address or RAY_ADDRESS); otherwise start a local one sized for this run."""
    import ray

    if ray.is_initialized():
        if address or not _STARTED_LOCAL or ray.cluster_resources().get("CPU", 0) >= local_resources(cfg)["CPU"]:
            return
        ray.shutdown()  # a multirun job needs more CPUs than the local cluster an earlier job started
    if address:
        # Workers checkpoint on SIGTERM (distft.preemption) unless the job's runtime env has a setup hook already.
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        hook = {} if "worker_process_setup_hook" in job_env else \
            {"runtime_env": {"worker_process_setup_hook": "distft.ray_hooks.setup_cluster_workers"}}
        ray.init(address=address, log_to_driver=True, **hook)
        console.drop_forwarded_noise()
        return
    console.quiet_local_driver()
    ray.init(num_cpus=local_resources(cfg)["CPU"], include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "distft.ray_hooks.quiet_local_workers",
                          "env_vars": LOCAL_RAY_ENV},
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    console.drop_forwarded_noise()
    _STARTED_LOCAL.append(True)


def torch_backend(cfg: DictConfig) -> str | None:
    """The process group's backend; None lets Ray choose (NCCL on GPUs, gloo on CPUs). FSDP with CPU offload keeps
    gradients as CPU tensors, so clipping needs a CPU collective beside NCCL (as torchtitan sets it up)."""
    from distft.strategy import strategy_sharding

    if not cfg.scaling.use_gpu:
        return None
    sharding = strategy_sharding(cfg.strategy.name, dict(cfg.strategy))
    if sharding.engine == "fsdp" and (sharding.offload_params or sharding.offload_optimizer):
        return "cuda:nccl,cpu:gloo"
    return None


def build_trainer(cfg: DictConfig, *, run_dir: Path, model_dir: str, storage: RunStorage | None = None,
                  plan: dict | None = None, train_rows=None):
    """Ray Train's TorchTrainer for this run. run.resume_from travels in the config: Ray Train 2.x refuses
    `resume_from_checkpoint` (it raises DeprecationWarning), so the workers open it (distft.worker). `train_rows`:
    an object-store reference to the training split as the driver's check built it (None: the workers build it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(max(1, int(s.cpus_per_worker))),
        "DISTFT_CACHE": str(cache_dir()),
        **{k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ},
        **{k: v for k, v in os.environ.items() if k.startswith(PASS_THROUGH_PREFIXES)},
        **{str(k): str(v) for k, v in cfg.run.env.items()},
    }
    if not s.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise probes for CUDA and fails on CPU workers
    storage = storage or RunStorage(cfg.run.storage_path, cfg.run.name)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": str(run_dir),
                           "model_dir": model_dir, "plan": plan, "train_rows": train_rows},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend=torch_backend(cfg), timeout_s=s.collective_timeout_s),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage.root,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            worker_runtime_env={"env_vars": env},
        ),
    )
