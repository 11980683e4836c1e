"""A real multi-node Ray cluster on one machine (`ray start` processes: a head with the dashboard and job server,
two 2-CPU worker nodes), used through the commands a user runs: `launch/submit.py` (Ray job submission) and
`python -m distft.train` joining the cluster. Slow tier; the cluster is shared by the tests of this module.

The processes are started here and stopped here, by pid (never `ray stop`, which would stop every Ray instance
on the machine).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distft.checkpoint import check_checkpoint
from tests.conftest import REPO
from tests.integration.conftest import curve

pytestmark = pytest.mark.slow

# Node death noticed in ~3 s instead of ~30 s, so the node-loss test does not wait on Ray's defaults.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
                             *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _node_ports() -> list[str]:
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            "--object-store-memory=300000000"]  # small: three nodes share this machine's RAM


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a `ray start --block` process and every process it started (by pid)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gsm8k_dir):
    root = tmp_path_factory.mktemp("cluster")
    ray_tmp = tempfile.mkdtemp(prefix="dft-", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    gcs_port, dashboard_port = _free_port(), _free_port()
    # A private test cluster on loopback: no auth token (a token left in ~/.ray by another cluster would not match).
    env = {**os.environ, "PYTHONPATH": str(REPO), "GSM8K_DIR": str(gsm8k_dir), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled",
           # a job's entrypoint says `python`: this interpreter, as in an image where it is the only one
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head = _ray("--head", f"--port={gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={_free_port()}", f"--temp-dir={ray_tmp}",
                f"--system-config={json.dumps(SYSTEM_CONFIG)}", *_node_ports(), env=env, log=root / "head.log")
    nodes = []
    try:
        _wait_for(lambda: _gcs_up(gcs_port), 120, "the head node", root / "head.log")
        for i in range(2):  # one at a time: nodes on one machine share the session dir and name files in it
            nodes.append(_ray(f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2", *_node_ports(), env=env,
                              log=root / f"node{i}.log"))
            _wait_for(lambda n=i + 2: _alive_nodes(gcs_port, env) == n, 120, f"{i + 2} alive nodes",
                      root / f"node{i}.log")
        _wait_for(lambda: _dashboard_up(dashboard_port), 120, "the job server", root / "head.log")
        yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env,
               "nodes": nodes, "root": root}
    finally:
        for proc in [*nodes, head]:
            _stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for(predicate, seconds: float, what: str, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _gcs_up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _dashboard_up(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _alive_nodes(gcs_port: int, env: dict) -> int:
    code = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1


def _node_running_a_train_worker(nodes: list[subprocess.Popen]) -> subprocess.Popen:
    """The `ray start` process whose node hosts a Ray Train worker (Ray titles those processes ray::RayTrainWorker)."""
    import psutil

    for proc in nodes:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    return proc
            except psutil.NoSuchProcess:
                continue
    raise AssertionError("no Ray Train worker found on the worker nodes")


TRAIN_ARGS = ["+experiment=gsm8k_full", "strategy=ddp", "model=tiny_llama", "hardware=cpu", "data.max_train_examples=96",
              "data.seq_len=384", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.warmup_steps=1",
              "trainer.lr=3e-3", "trainer.progress_bar=false", "eval.enabled=false", "run.export=false",
              "scaling.num_workers=2", "scaling.placement_strategy=SPREAD"]


@pytest.fixture(scope="module")
def submitted_job(cluster, gsm8k_dir):
    """`python launch/submit.py --address http://HEAD:8265 -- ...`: a Ray job on 2 workers over 2 nodes."""
    storage = cluster["root"] / "runs"
    started = time.time()
    out = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), "--address", cluster["dashboard"], "--poll-seconds=2",
         "--env", f"GSM8K_DIR={gsm8k_dir}", "--env", "PYTHONPATH=.", "--",
         *TRAIN_ARGS, f"data.path={gsm8k_dir}", f"run.storage_path={storage}", "run.name=job"],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    return {"rc": out.returncode, "output": out.stdout + out.stderr, "run_dir": storage / "job",
            "seconds": time.time() - started}


def test_ray_job_submission_runs_on_two_nodes(submitted_job):
    assert submitted_job["rc"] == 0, submitted_job["output"][-5000:]
    assert "SUCCEEDED" in submitted_job["output"]
    run_dir = submitted_job["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["worker_nodes"] == 2  # SPREAD put the 2 workers on the 2 worker nodes
    assert sorted(curve(str(run_dir))) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "config.yaml").exists()
    assert check_checkpoint(run_dir / "checkpoint_000006") is None


def test_a_lost_node_restarts_from_the_latest_checkpoint_with_the_identical_curve(cluster, submitted_job, gsm8k_dir):
    assert submitted_job["rc"] == 0, "needs the uninterrupted run of the job test"
    storage = cluster["root"] / "runs"
    run_dir = storage / "node-lost"
    # rank 0 pauses once after step 3 (checkpoint 2 is committed), so the node goes away mid-run, not after it
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"], "DISTFT_FAULT_AT_STEP": "3:0:sleep"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "distft.train", *TRAIN_ARGS, f"data.path={gsm8k_dir}", f"run.storage_path={storage}",
         "run.name=node-lost", "run.max_failures=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    # wait until rank 0 pauses after step 3 and Ray has committed checkpoint 2 (the controller polls reports)
    while not ((run_dir / ".fault_injected_step3_rank0").exists() and snapshot.exists()
               and "checkpoint_000002" in snapshot.read_text()):
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()[-5000:]
        time.sleep(0.2)
    _stop(_node_running_a_train_worker(cluster["nodes"]), signal.SIGKILL)  # raylet, workers, agents: all at once
    output, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, output[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumed_from"] and "checkpoint_00000" in summary["resumed_from"], output[-8000:]
    assert summary["worker_nodes"] == 1  # the restarted workers share the surviving node
    assert curve(str(run_dir)) == curve(str(submitted_job["run_dir"]))
