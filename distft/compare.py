"""`python -m distft.train +experiment=gsm8k_compare [overrides]`: full vs LoRA vs QLoRA (or any arms) in one command.

Each arm's config is composed again by Hydra from the same command-line overrides plus the arm's own (`method=`,
`trainer.lr=`, `compare.arms.<name>.overrides`), so group choices resolve exactly as they would on the command line
and every arm shares the data, budget and seeds. With `compare.seeds=[1,2,3]` every arm runs once per seed (run
`<arm>-seed<k>`, `trainer.seed=<k>`), so the report can show the spread over seeds. Every run is validated before any
starts. Runs then go as normal runs (`distft.launch.launch`), each a complete run directory under one compare
directory: one after another, or as concurrent Ray tasks when the cluster has room for several (Ray Train V2
trainers can be driven from tasks, the way Ray Tune drives them). compare.json records them, and the report
(`distft.report`) follows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from distft.config import hydra_context, validate_cluster, validate_config
from distft.config.explain import added_keys_problem, explain, unknown_keys
from distft.errors import ConfigError, UserError
from distft.eval.export_eval import evaluate_export, write_result
from distft.launch import init_ray, launch, local_resources, ray_initialized
from distft.model import resolve_model_dir
from distft.plan import PlanRefused, check_plan
from distft.precheck import check_inputs, check_storage
from distft.report import write_report
from distft.storage import RunStorage

# Keys each arm sets itself; the same keys on the command line would clash (Hydra refuses a group chosen twice).
ARM_KEYS = ("method", "trainer.lr", "run.name", "run.storage_path", "compare.enabled")


def compare_dir(cfg: DictConfig) -> Path:
    return Path(to_absolute_path(cfg.run.storage_path)) / cfg.run.name


def enabled_arms(cfg: DictConfig) -> list[str]:
    return [name for name, arm in cfg.compare.arms.items() if arm.enabled]


def arm_runs(cfg: DictConfig) -> list[tuple[str, str, int | None]]:
    """(run name, arm name, seed) of every run the compare makes: one per enabled arm, or with compare.seeds one
    per arm and seed, named <arm>-seed<k>."""
    seeds = cfg.compare.seeds
    if seeds is None:
        return [(name, name, None) for name in enabled_arms(cfg)]
    return [(f"{name}-seed{seed}", name, seed) for name in enabled_arms(cfg) for seed in seeds]


def arm_overrides(cfg: DictConfig, name: str, overrides: list[str], root: Path, *, seed: int | None = None,
                  run_name: str | None = None) -> list[str]:
    """The Hydra overrides that compose arm `name` (as run `run_name`, default the arm's name): the command line's,
    minus the keys the arm decides, plus the arm's own. Later entries win, so the arm's extra overrides can change
    anything the command line set; a compare.seeds seed comes after them, since the seeds are what the runs of
    one arm differ in."""
    arm = cfg.compare.arms[name]
    extra = list(arm.overrides)
    decided = set(ARM_KEYS) | {_key(o) for o in extra} | ({"trainer.seed"} if seed is not None else set())
    kept = [o for o in overrides if _key(o) not in decided and not _key(o).startswith("hydra")]
    own = [f"method={arm.method}"] if arm.method else [o for o in overrides if _key(o) == "method"]
    if arm.lr is not None:
        own.append(f"trainer.lr={arm.lr}")
    elif any(_key(o) == "trainer.lr" for o in overrides):
        own += [o for o in overrides if _key(o) == "trainer.lr"]
    seeded = [f"trainer.seed={seed}"] if seed is not None else []
    group = [] if cfg.logger.group else [f"logger.group={cfg.run.name}"]
    return [*kept, *own, *extra, *seeded, *group, "compare.enabled=false", f"run.storage_path={root}",
            f"run.name={run_name or name}"]


def _key(override: str) -> str:
    parsed = OverridesParser.create().parse_overrides([override])[0]
    return parsed.key_or_group


def compose_arms(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """Compose every run of every enabled arm (run name -> config); raise one ConfigError listing every arm that
    cannot be composed or validated (once, however many seeds it runs)."""
    from hydra import compose

    if not enabled_arms(cfg):
        raise ConfigError(["compare.enabled=true but no arm is enabled; set compare.arms.<name>.enabled=true"])
    root = compare_dir(cfg)
    arms, problems = {}, compare_problems(cfg.compare)
    with hydra_context():
        for run_name, name, seed in arm_runs(cfg):
            arm = arm_overrides(cfg, name, overrides, root, seed=seed, run_name=run_name)
            try:
                arm_cfg = compose("train", overrides=arm)
            except Exception as e:  # noqa: BLE001 - Hydra's message names the bad override; report it per arm
                problems.append(f"compare.arms.{name}: {explain(e, arm)}")
                continue
            added = unknown_keys(arm_cfg)
            if added:
                problems.append(f"compare.arms.{name}: {added_keys_problem(added)}")
            if arm_cfg.data.path is not None:
                arm_cfg.data.path = to_absolute_path(arm_cfg.data.path)
            try:
                validate_config(arm_cfg)
            except ConfigError as e:
                problems += [f"compare.arms.{name}: {p}" for p in e.problems]
            if cfg.compare.final_eval and not arm_cfg.run.export:
                problems.append(f"compare.arms.{name}: compare.final_eval=true scores the export, but run.export=false")
            arms[run_name] = arm_cfg
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # an arm's problems repeat for each of its seeds
    return arms


def compare_problems(compare: DictConfig) -> list[str]:
    """What is wrong with the compare's own keys (seeds, samples)."""
    problems = []
    seeds = compare.seeds
    if seeds is not None and len(seeds) == 0:
        problems.append("compare.seeds=[] runs nothing; give one seed or more (compare.seeds=[1,2,3]), or null for "
                        "one run per arm")
    elif seeds is not None and len(set(seeds)) < len(seeds):
        repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
        problems.append(f"compare.seeds={list(seeds)} repeats seed {', '.join(map(str, repeated))}; each seed runs "
                        "once per arm")
    if compare.samples < 0:
        problems.append(f"compare.samples={compare.samples} must be 0 (no answers in the report) or more")
    return problems


def compare_record(cfg: DictConfig, arms: dict[str, DictConfig], overrides: list[str]) -> dict:
    """The first compare.json. Run directories are relative to the compare directory, so the record stays valid
    when the directory is moved, copied or committed; each run keeps its resolved config, from which the report
    recomputes cost and config differences when a run directory lacks its config.yaml."""
    runs = {run_name: (name, seed) for run_name, name, seed in arm_runs(cfg)}
    return {"name": cfg.run.name, "compare_dir": str(compare_dir(cfg)), "overrides": list(overrides),
            "seeds": list(cfg.compare.seeds) if cfg.compare.seeds is not None else None,
            "arms": {run_name: {"run_dir": run_name, "arm": runs[run_name][0], "seed": runs[run_name][1],
                                "status": "pending", "error": None,
                                "config": OmegaConf.to_container(arm_cfg, resolve=True)}
                     for run_name, arm_cfg in arms.items()}}


def arm_resources(cfg: DictConfig) -> dict[str, float]:
    s = cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    return need


def concurrency(arms: dict[str, DictConfig], available: dict, limit: int | None) -> int:
    """How many arms (taken in order) fit the cluster's free resources at once; at least 1."""
    used: dict[str, float] = {}
    fit = 0
    for arm_cfg in arms.values():
        need = arm_resources(arm_cfg)
        if any(used.get(k, 0) + v > available.get(k, 0) for k, v in need.items()):
            break
        for k, v in need.items():
            used[k] = used.get(k, 0) + v
        fit += 1
    fit = max(fit, 1)
    return min(fit, limit) if limit else fit


def run_compare(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run every arm, write compare.json and the report; return the compare record."""
    import ray

    if cfg.compare.max_concurrent is not None and cfg.compare.max_concurrent < 1:
        raise ConfigError([f"compare.max_concurrent={cfg.compare.max_concurrent} must be at least 1 (or null)"])
    root = compare_dir(cfg)
    arms = compose_arms(cfg, overrides)
    address = next(iter(arms.values())).run.address or os.environ.get("RAY_ADDRESS")
    if not address and not ray_initialized():  # check each arm fits a local cluster before starting one
        _each_arm(arms, lambda c: validate_cluster(c, local_resources(c)))
    check_arm_inputs(arms, joins_cluster=bool(address) or ray_initialized())
    init_ray(_largest(arms), address)
    _each_arm(arms, lambda c: validate_cluster(c, ray.cluster_resources()))

    root.mkdir(parents=True, exist_ok=True)
    record = compare_record(cfg, arms, overrides)
    _write(root, record)
    parallel = concurrency(arms, ray.available_resources(), cfg.compare.max_concurrent)
    record["max_concurrent"] = parallel
    print(f"distft: compare '{cfg.run.name}': {len(arms)} run(s), {parallel} at a time -> {root}", file=sys.stderr)
    started = time.time()
    if parallel == 1:
        for name, arm_cfg in arms.items():
            record["arms"][name].update(_run_arm(arm_cfg))
            _write(root, record)
    else:
        _run_concurrently(arms, record, parallel, root)
    record["wall_seconds"] = time.time() - started
    _write(root, record)
    if cfg.compare.final_eval:
        for name, arm_cfg in arms.items():
            if record["arms"][name]["status"] == "completed":
                record["arms"][name]["final_eval"] = final_eval(arm_cfg, cfg.compare)
                _write(root, record)
    if cfg.compare.report:
        record["report"] = write_report([root], out_dir=root, wandb="auto", samples=cfg.compare.samples).name
        _write(root, record)
    return record


def check_arm_inputs(arms: dict[str, DictConfig], *, joins_cluster: bool) -> None:
    """Each arm's storage, model and data (distft.precheck), before Ray starts; arms reading the same data with the
    same model and batch layout are checked once. Then every arm's plan (distft.plan.check_plan): one error names
    each arm the plan says does not fit (plan.enforce=false runs them anyway). The arm's own launch plans again,
    which then passes."""
    seen = set()
    for name, arm_cfg in arms.items():
        t = arm_cfg.trainer
        key = (OmegaConf.to_yaml(OmegaConf.masked_copy(arm_cfg, ["model", "data", "eval", "scaling"]), resolve=True),
               t.global_batch_size, t.micro_batch_size, arm_cfg.run.storage_path)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_storage(arm_cfg.run.storage_path)
            model_dir = resolve_model_dir(**OmegaConf.to_container(arm_cfg.model, resolve=True))
            for note in check_inputs(arm_cfg, model_dir, joins_cluster=joins_cluster).notes:
                print(f"distft: note: compare.arms.{name}: {note}", file=sys.stderr)
        except UserError as e:
            raise UserError(f"compare.arms.{name}: {e}") from None
    refused = []
    for name, arm_cfg in arms.items():
        try:  # the model directory is prepared by now (once per machine): resolving it again is a lookup
            check_plan(arm_cfg, resolve_model_dir(**OmegaConf.to_container(arm_cfg.model, resolve=True)))  # plan.enforce=false: the arm's launch warns
        except PlanRefused as e:
            refused.append(f"compare.arms.{name}: {e}")
        except Exception:  # noqa: BLE001, S110 - a planner failure never stops a run; the arm's launch warns
            pass
    if refused:
        raise PlanRefused("\n".join(refused))


def _run_arm(arm_cfg: DictConfig) -> dict:
    """One arm as a normal run. A completed arm (a rerun of the same compare) is kept, not trained again."""
    if RunStorage(arm_cfg.run.storage_path, arm_cfg.run.name).completed():
        print(f"distft: compare arm '{arm_cfg.run.name}' already completed; keeping it", file=sys.stderr)
        return {"status": "completed", "error": None, "reused": True}
    try:
        summary = launch(arm_cfg)
    except UserError as e:
        return {"status": "failed", "error": str(e)}
    return {"status": summary["status"], "error": summary["error"]}


def final_eval(arm_cfg: DictConfig, compare: DictConfig) -> dict:
    """The task's metric on the arm's export over Ray actors (distft.eval), written with every question's result to
    <run dir>/eval_<data.name>.json (eval_gsm8k.json for GSM8K), where the report looks for it."""
    run_dir = Path(arm_cfg.run.storage_path) / arm_cfg.run.name
    s = arm_cfg.scaling
    result = evaluate_export(run_dir / "export", examples=compare.final_eval_examples,
                             workers=compare.final_eval_workers or s.num_workers, batch_size=arm_cfg.eval.batch_size,
                             cpus_per_worker=s.cpus_per_worker, gpus_per_worker=s.gpus_per_worker if s.use_gpu else 0)
    write_result(result, run_dir / f"eval_{arm_cfg.data.name}.json")
    return {k: result[k] for k in ("task", "metric", "accuracy", "gsm8k_accuracy", "num_examples", "seconds")
            if k in result}


def _run_concurrently(arms: dict[str, DictConfig], record: dict, parallel: int, root: Path) -> None:
    """At most `parallel` arms in flight, each driven by a zero-CPU Ray task (its workers hold the resources)."""
    import ray

    remote = ray.remote(num_cpus=0, max_retries=0)(_run_arm)
    pending = list(arms.items())
    running: dict = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, arm_cfg = pending.pop(0)
            running[remote.options(name=f"distft-compare-{name}").remote(arm_cfg)] = name
            record["arms"][name]["status"] = "running"
        _write(root, record)
        done, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(done[0])
        try:
            record["arms"][name].update(ray.get(done[0]))
        except Exception as e:  # noqa: BLE001 - the arm's driver task died; record it and go on
            record["arms"][name].update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        _write(root, record)


def _each_arm(arms: dict[str, DictConfig], check) -> None:
    problems = []
    for name, arm_cfg in arms.items():
        try:
            check(arm_cfg)
        except ConfigError as e:
            problems += [f"compare.arms.{name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)


def _largest(arms: dict[str, DictConfig]) -> DictConfig:
    return max(arms.values(), key=lambda c: arm_resources(c)["CPU"])


def _write(root: Path, record: dict) -> None:
    tmp = root / "compare.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(root / "compare.json")
