"""`preflight=true`: one real step on 2 Ray workers, a checkpoint save and its reload, measured vs planned memory."""

import json
from pathlib import Path

import pytest

from distft.tracking import read_metrics
from tests.integration.conftest import run_tiny


@pytest.mark.slow
def test_preflight_runs_one_step_saves_reloads_and_compares_memory(tmp_path, gsm8k_dir, ray_cluster, capsys):
    summary = run_tiny(tmp_path, gsm8k_dir, "pf", "lora", "strategy=zero3", "preflight=true")
    assert summary["status"] == "completed", summary["error"]
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.startswith("pf-preflight-")  # never the real run's directory (no resume from it)
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["reloaded"] and report["reload_checksum"]["equal"]
    assert Path(report["checkpoint"]).name == "checkpoint_000001"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]  # stopped after one step
    measured, predicted = report["measured_peak_bytes_per_worker"], report["predicted_peak_bytes_per_worker"]
    assert len(measured) == len(predicted) == 2
    for ratio in report["ratio_measured_to_predicted"]:
        assert 0.8 <= ratio <= 1.2, report  # the bench's ±20% on this very configuration
    assert summary["plan"]["measured_peak_bytes_per_worker"] == measured
    assert "measured/predicted" in capsys.readouterr().out
