"""`preflight=true`: one real step on 2 Ray workers, a checkpoint save and its reload, measured vs planned memory."""

import json

import pytest

from distft.checkpoint import check_checkpoint
from distft.tracking import read_metrics
from tests.integration.conftest import run_tiny


@pytest.mark.slow
def test_preflight_runs_one_step_saves_reloads_and_compares_memory(tmp_path, gsm8k_dir, ray_cluster, capsys):
    # URI storage, as on a cluster: the reload reads the checkpoint back from storage, not from a local directory
    storage = f"file://{tmp_path}/store"
    summary = run_tiny(tmp_path, gsm8k_dir, "pf", "lora", "strategy=zero3", "preflight=true",
                       f"run.storage_path={storage}")
    assert summary["status"] == "completed", summary["error"]
    assert summary["run_dir"].startswith(f"{storage}/pf-preflight-")  # never the real run's directory
    run_dir = tmp_path / "store" / summary["run_dir"].rsplit("/", 1)[-1]
    report = json.loads((run_dir / "preflight.json").read_text())  # uploaded to storage
    assert report["run_dir"] == summary["run_dir"]
    assert report["reloaded"] and report["reload_checksum"]["equal"]
    assert report["checkpoint"] == f"{summary['run_dir']}/checkpoint_000001"
    assert check_checkpoint(run_dir / "checkpoint_000001") is None
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]  # stopped after one step
    measured, predicted = report["measured_peak_bytes_per_worker"], report["predicted_peak_bytes_per_worker"]
    assert len(measured) == len(predicted) == 2
    for ratio in report["ratio_measured_to_predicted"]:
        assert 0.8 <= ratio <= 1.2, report  # the bench's ±20% on this very configuration
    assert summary["plan"]["measured_peak_bytes_per_worker"] == measured
    phases = report["phases"]  # per phase: measured per worker next to the plan's prediction
    assert set(phases) == {"load", "prepare", "eval", "train", "save", "reload"}  # eval: eval.at_start=true
    assert max(max(p["measured"]) for p in phases.values()) == max(measured)
    assert len(phases["train"]["measured"]) == len(phases["train"]["predicted"]) == 2
    assert phases["reload"]["predicted"] is None and phases["prepare"]["predicted"] is None
    assert "measured/predicted" in capsys.readouterr().out
