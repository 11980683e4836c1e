"""Failures a big run meets, on 2 Ray CPU workers with a tiny random Llama (slow tier).

Already covered in test_train_ray.py: a worker killed mid-run resumes to the identical curve
(`test_worker_killed_mid_run_resumes_to_the_identical_loss_curve`). Rerunning a failed run, i.e. the state a
killed driver leaves behind, resumes: the last run of the NaN chain below (same name and storage after a failed run).
Runs are combined where honest: each test below checks several failures on one chain of runs.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distft.checkpoint import check_checkpoint, read_meta
from distft.errors import UserError
from tests.conftest import REPO
from tests.integration.conftest import curve, run_tiny

pytestmark = pytest.mark.slow

# 10 steps (a checkpoint every 2): the schedule of the DDP parity run, whose curve is the uninterrupted one
COMMON = ("eval.enabled=false", "trainer.max_steps=10")
NO_EXPORT = "run.export=false"


@pytest.fixture(scope="module")
def clean_curve(ddp_parity_curves) -> dict[int, float]:
    """The uninterrupted full fine-tuning curve: the DDP parity run (same data, schedule and seed)."""
    return ddp_parity_curves["full"]


def _checkpoints(run_dir: Path) -> dict[str, str | None]:
    return {p.name: check_checkpoint(p) for p in sorted(run_dir.glob("checkpoint_*")) if p.is_dir()}


def test_nan_loss_beyond_max_failures_then_corrupt_latest_checkpoint_on_uri_storage(
        tmp_path, gsm8k_dir, ray_cluster, clean_curve, monkeypatch):
    """NaN loss stops before the optimizer step, twice (max_failures=1), and the error names rank and cause; no
    checkpoint of the NaN step exists. Then the latest checkpoint is truncated: an explicit resume_from of it fails
    loudly, and the rerun falls back to the previous complete one, with a warning, to the identical curve. The run
    lives behind a file:// URI, so storage goes through pyarrow and the staging copy."""
    storage = f"file://{tmp_path}/store"
    run_dir = tmp_path / "store" / "nan"
    monkeypatch.setenv("DISTFT_FAULT_AT_STEP", "5:0:nan")  # rank 0's loss at step 5 is NaN, on every attempt
    started = time.time()
    failed = run_tiny(tmp_path, gsm8k_dir, "nan", "full", *COMMON, f"run.storage_path={storage}",
                      "run.max_failures=1")
    assert time.time() - started < 300  # no hang
    assert failed["status"] == "failed"
    assert "ranks 0, 1: FloatingPointError: loss is nan at step 5; stopped before the optimizer step" in failed["error"]
    assert "run.max_failures=1" in failed["error"]
    assert failed["run_dir"] == f"{storage}/nan"
    on_disk = json.loads((run_dir / "summary.json").read_text())  # uploaded to the URI
    assert on_disk["status"] == "failed" and on_disk["error"] == failed["error"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    # only complete checkpoints of steps before the NaN; the second attempt resumed from step 4 and wrote nothing
    assert _checkpoints(run_dir) == {"checkpoint_000002": None, "checkpoint_000004": None}
    assert [read_meta(run_dir / c)["step"] for c in ("checkpoint_000002", "checkpoint_000004")] == [2, 4]
    assert sorted(curve(str(run_dir))) == [1, 2, 3, 4]

    # a crash while a checkpoint is copied / a damaged latest checkpoint: truncate one rank's file
    bad = run_dir / "checkpoint_000004" / "rank1_state.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    assert "truncated" in check_checkpoint(run_dir / "checkpoint_000004")
    with pytest.raises(UserError, match=r"run.resume_from=.*checkpoint_000004 is not a usable checkpoint.*rank1_state"):
        run_tiny(tmp_path, gsm8k_dir, "from-bad", "full", *COMMON, NO_EXPORT, f"run.storage_path={storage}",
                 f"run.resume_from={storage}/nan/checkpoint_000004")

    monkeypatch.delenv("DISTFT_FAULT_AT_STEP")
    # a complete checkpoint named explicitly starts a new run from it (Ray Train 2.x raises on TorchTrainer's
    # resume_from_checkpoint, so the workers open run.resume_from themselves) and continues the same curve
    good = run_tiny(tmp_path, gsm8k_dir, "from-good", "full", *COMMON, NO_EXPORT, f"run.storage_path={storage}",
                    f"run.resume_from={storage}/nan/checkpoint_000002")
    assert good["status"] == "completed", good["error"]
    assert good["resumed_from"] == f"{storage}/nan/checkpoint_000002"
    assert curve(str(tmp_path / "store" / "from-good")) == {s: v for s, v in clean_curve.items() if s > 2}

    rerun = run_tiny(tmp_path, gsm8k_dir, "nan", "full", *COMMON, f"run.storage_path={storage}")
    assert rerun["status"] == "completed", rerun["error"]
    assert rerun["resumed_from"] == f"{storage}/nan/checkpoint_000002"
    assert "checkpoint_000004" in rerun["resume_warning"] and "incomplete" in rerun["resume_warning"]
    assert curve(str(run_dir)) == clean_curve
    # retention (num_to_keep=2) kept only complete checkpoints, and every one Ray still lists exists
    kept = _checkpoints(run_dir)
    assert len(kept) == 2 and all(problem is None for problem in kept.values()), kept
    assert max(read_meta(run_dir / c)["step"] for c in kept) == 10
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    for name in kept:
        assert name in snapshot
    # distft's own files reached the URI: export, summary pointing at it
    assert rerun["export_dir"] == f"{storage}/nan/export"
    assert (run_dir / "export" / "model.safetensors").exists() and (run_dir / "train_result.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _tiny_command(tmp_path: Path, gsm8k_dir: Path, name: str, *overrides: str) -> list[str]:
    """The same run as `run_tiny(..., "full", *overrides)` with the evaluation at the start on, as a command line."""
    return [sys.executable, "-m", "distft.train", "+experiment=gsm8k_full", "model=tiny_llama", "hardware=cpu",
            "strategy=ddp",
            f"run.storage_path={tmp_path}", f"run.name={name}", f"data.path={gsm8k_dir}",
            "data.max_train_examples=96", "data.seq_len=384", "trainer.max_steps=10", "trainer.checkpoint_every=2",
            "trainer.warmup_steps=1", "trainer.lr=3e-3", "trainer.progress_bar=false", "eval.loss_examples=16",
            "eval.gsm8k_examples=4", "eval.max_new_tokens=8", "eval.at_start=true", "scaling.num_workers=2",
            NO_EXPORT, *overrides]


def _start(command: list[str], env: dict) -> tuple[subprocess.Popen, list[str]]:
    """The command in the background, its output collected line by line as it comes."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(proc: subprocess.Popen, lines: list[str], text: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)


def test_sigterm_during_the_first_evaluation_then_to_a_worker_mid_training(
        tmp_path, gsm8k_dir, ray_cluster, clean_curve, monkeypatch):
    """Preemption notices. SIGTERM to the driver (as `ray job stop`, SLURM or Kubernetes send it) while the
    evaluation before training generates: the workers stop at their next prompt batch, the run exits as `stopped`
    before the first step with nothing to save. The rerun gets SIGTERM on a worker process at step 3: every rank
    saves step 3 and the run exits as `stopped`; rerunning resumes from it to the uninterrupted curve."""
    import ray

    run_dir = tmp_path / "pre"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # a generation that takes a while (64 prompts of 96 tokens, one at a time), so the signal lands inside it
    driver, lines = _start(_tiny_command(tmp_path, gsm8k_dir, "pre", "eval.gsm8k_examples=64",
                                         "eval.max_new_tokens=96", "eval.batch_size=1"), env)
    _wait_for(driver, lines, "evaluation before training: generation")
    signalled = time.time()
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=240)
    output = "".join(lines)
    assert driver.returncode == 3, output[-3000:]
    assert time.time() - signalled < 60, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and "SIGTERM received by the driver" in summary["error"]
    assert summary["steps"] == 0 and summary["stopped_phase"] == "evaluation"
    assert _checkpoints(run_dir) == {} and not (run_dir / "eval_start.json").exists()
    assert "before the first step (nothing to save); rerun the same command to start again" in output
    assert "Traceback" not in output

    # the rerun starts from scratch; now rank 1 receives SIGTERM at step 3 (a worker-side preemption)
    monkeypatch.setenv("DISTFT_FAULT_AT_STEP", "3:1:sigterm")
    second = run_tiny(tmp_path, gsm8k_dir, "pre", "full", *COMMON, NO_EXPORT)
    assert second["status"] == "stopped", second["error"]
    assert second["error"] == "SIGTERM received by a worker" and second["stopped_phase"] == "training"
    assert second["resumed_from"] is None
    assert second["steps"] == 3 and _checkpoints(run_dir)["checkpoint_000003"] is None

    monkeypatch.delenv("DISTFT_FAULT_AT_STEP")
    third = run_tiny(tmp_path, gsm8k_dir, "pre", "full", *COMMON, NO_EXPORT)
    assert third["status"] == "completed", third["error"]
    assert third["resumed_from"].endswith("checkpoint_000003")
    assert curve(str(run_dir)) == clean_curve


def test_a_user_error_on_a_worker_is_one_message_without_tracebacks(tmp_path, gsm8k_dir, ray_cluster):
    """A worker that finds a problem in the input (here an injected DataError at step 1 on rank 0): the console shows
    its message once, no Python traceback from any process; exit code 2; summary.json has the message; the traceback
    is in the run's logs/."""
    import ray

    run_dir = tmp_path / "user"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "DISTFT_FAULT_AT_STEP": "1:0:user_error"}
    out = subprocess.run(_tiny_command(tmp_path, gsm8k_dir, "user", *COMMON), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert output.count("an injected problem in the data at step 1") == 1, output[-3000:]
    assert "distft: error: DISTFT_FAULT_AT_STEP: an injected problem" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_kind"] == "user"
    assert "an injected problem in the data at step 1" in summary["error"] and "rank 0" in summary["error"]
    assert "Traceback" in (run_dir / "logs" / "worker-rank0.log").read_text()
