"""bench/bench_peers.py and bench/bench_launcher.py with --dry-run, bench/bench_scale.py with --shape tiny (tiny random
Llama, a few steps): the commands behind docs/benchmarks.md's peer, launcher and loading-at-scale figures, run end to
end so that they cannot rot. Not timings."""

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import GSM8K_DIR, REPO

pytestmark = pytest.mark.slow


def bench(script: str, tmp_path, *args: str) -> dict:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
    # A Ray instance of its own (the session's may be up): a short temp dir keeps Ray's socket paths legal.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(GSM8K_DIR=str(GSM8K_DIR), PYTHONPATH=str(REPO), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.nightly  # ~130 s: moved out of CI to keep it under 45 min (make test-nightly runs it)
def test_peer_benchmark_runs_every_system_on_the_same_work_and_measures_it(tmp_path):
    report = bench("bench_peers.py", tmp_path, "--systems", "distft,trl,hf,plain")
    systems = report["systems"]
    assert set(systems) == {"distft", "trl", "hf", "plain"}
    steps = report["spec"]["steps"]
    for name, r in systems.items():
        assert len(r["rows"]) == steps and len(r["losses"]) == steps, name
        assert r["steady_tokens_per_second"] > 0 and r["wall_seconds"] > 0, name
        assert math.isfinite(r["heldout_loss"]), name
        # the same held-out examples for every system (those of the first eval_examples that fit in seq_len)
        assert 0 < r["heldout_examples"] == report["base_model"]["heldout_examples"] <= report["spec"]["eval_examples"]
        assert 0 <= r["padding_share"] < 1, name
        assert max(v["max_bytes"] for v in r["rss"].values()) > 100 * 2**20, name
    # the evaluator reads the trained adapter, not the base model alone
    assert systems["trl"]["heldout_loss"] != report["base_model"]["heldout_loss"]
    # distft and the plain loop train the same packed rows; TRL's padding-free rows and HF's padded batches differ
    assert systems["distft"]["packed_rows"] == systems["plain"]["packed_rows"]
    assert systems["trl"]["padding_share"] == 0 and systems["hf"]["padding_share"] > 0
    assert systems["hf"]["examples_per_step"] >= report["spec"]["global_rows"]
    # distft's process tree: the driver, two training workers, Ray's own processes, each with a CPU share
    rss = systems["distft"]["rss"]
    assert rss["main"]["processes"] == 1 and rss["train_worker"]["processes"] == 2
    assert {"ray:raylet", "ray:gcs_server", "ray::StopFlag"} <= set(rss)
    assert systems["distft"]["cpu_share_steady"]["train_worker"] > 0
    assert systems["distft"]["distft_summary"]["status"] == "completed"


@pytest.mark.nightly  # ~70-85 s: moved out of CI to keep it under 45 min, as the peer benchmark's dry run
def test_launcher_benchmark_runs_the_same_recipe_under_ray_and_torchrun(tmp_path):
    report = bench("bench_launcher.py", tmp_path)
    kinds = [r["kind"] for r in report["runs"]]
    assert sorted(kinds) == ["distft", "torchrun"]
    for r in report["runs"]:
        assert r["status"] == "completed" and len(r["losses"]) == report["steps"]
        assert r["wall_seconds"] > r["loop_seconds"] > 0
        start = r["startup_cpu"]  # where the time before the first step went, in CPU by process
        assert start["train_workers"] > 0 and start["all"] >= start["train_workers"] + start["main"]
        assert 0 < start["seconds"] < r["outside_loop_seconds"]
    # one recipe, two launchers: the same seed, rows and sharding give the same loss curve
    assert report["same_losses_both"] is True


@pytest.mark.nightly  # ~2 min of DeepSpeed and FSDP start-ups; the streaming load itself is tested in CI
def test_scale_benchmark_measures_every_phase_and_puts_the_planner_beside_it(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_scale.py"), "--shape", "tiny", "--out", str(out),
                           "--work-root", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {(r["case"]["part"], r["case"]["strategy"]) for r in runs} == {
        ("load", "ddp"), ("load", "fsdp"), ("load", "zero3"), ("state", "fsdp"), ("state", "zero3")}
    for r in runs:  # no --before checkout: today's code only, each with the planner's figures
        assert r["failed"] is None and r["case"]["code"] == "today" and r["plan"]["host_per_node_load"] > 0
        phases = ("load", "prepare") + (() if r["case"]["part"] == "load" else ("step", "save", "restore", "export"))
        for rank in r["ranks"]:
            assert set(rank["phases"]) == set(phases)
            assert all(rank["phases"][p]["peak_rss"] > 0 and rank["phases"][p]["seconds"] > 0 for p in phases)
        if r["case"]["part"] == "state":
            assert r["ranks"][0]["checkpoint_bytes"] > 0 and r["ranks"][0]["export_bytes"] > 0
            assert r["ranks"][0]["export_check"]["ok"] is True
    assert "Loading `tiny`" in proc.stdout and "| zero3 | today |" in proc.stdout


@pytest.mark.nightly  # ~15 s; the merge itself is tested bit for bit in CI (tests/unit/test_merge.py)
def test_merge_benchmark_runs_both_merges_and_finds_them_identical(tmp_path):
    out = tmp_path / "merge.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_merge.py"), "--shape", "tiny", "--out", str(out),
                           "--work-root", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["identical"] is True
    for way in ("streamed", "peft"):
        run = result["runs"][way]
        assert run["peak_rss"] > 0 and run["seconds"] > 0 and run["out_bytes"] > 0
    assert "| streamed |" in proc.stdout
