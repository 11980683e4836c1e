"""bench/gpu_check.py, the command a GPU slot runs, exercised on CPU with --dry-run (tiny shapes, fp32) so it cannot
rot between GPU slots; on a CUDA machine the `gpu` test runs the real check."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import GSM8K_DIR, REPO

CHECK = REPO / "bench" / "gpu_check.py"


def run_check(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
    env = {**os.environ, "GSM8K_DIR": str(GSM8K_DIR), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text()) if (tmp_path / "gpu_check.json").exists() else {}
    return proc, report


def test_dry_run_runs_every_part_of_the_gpu_check(tmp_path):
    proc, report = run_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(report["parts"]) == {"matrix", "mfu", "lora7b", "qlora7b"} and report["dry_run"] is True
    matrix = {k: v for k, v in report["parts"]["matrix"].items() if isinstance(v, dict)}
    assert set(matrix) == {"ddp-full", "ddp-lora", "ddp-qlora", "fsdp-lora", "zero3-lora"}
    for name, cell in matrix.items():
        assert cell["steps"] == 3 and cell["finite"] and cell["export_check"]["ok"], name
        assert cell["planned_peak_bytes"] > 0 and cell["peak_memory_bytes"] > 0
        host = cell["host"]  # sampled while the recipe ran: the loader's host memory beside the plan's
        assert host["anon_peak"] >= host["anon_before"] > 0 and host["file_peak"] > 0 and host["planned_load"] > 0
        assert any(o.startswith("strategy=") for o in cell["overrides"])  # the run can be repeated by hand
    # one rank, fp32, the same seed and rows: every engine takes the same LoRA steps as DDP
    for name in ("fsdp-lora", "zero3-lora"):
        assert matrix[name]["losses"] == pytest.approx(matrix["ddp-lora"]["losses"], rel=1e-4), name
    lora7b = report["parts"]["lora7b"]
    assert lora7b["distft"]["steps"] == lora7b["hf_trainer_peft"]["steps"] == 3
    assert lora7b["distft_vs_hf"] > 0 and report["parts"]["mfu"]["mfu"] is None  # no peak FLOP/s on CPU
    assert (tmp_path / "gpu_check.log").stat().st_size > 0 and "all ran" in proc.stdout


def test_a_run_without_cuda_and_without_dry_run_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, _ = run_check(tmp_path)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_this_gpu(tmp_path):
    proc, report = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all("error" not in part for part in report["parts"].values())
