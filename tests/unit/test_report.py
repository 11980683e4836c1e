"""distft.report from synthetic run directories: rows, best-of-sweep, failed/missing rows, sizes, cost, plots."""

import json
from pathlib import Path

import pytest
import yaml

from distft.eval import wilson_interval
from distft.report import main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir: Path, *, method: str, lr: float, correct: int = 2, n: int = 8, eval_loss: float = 1.0,
             status: str = "completed", price: float | None = None, export_bytes: int = 1000,
             ckpt_bytes: int = 500) -> Path:
    """A run directory shaped like the ones distft.train writes."""
    run_dir.mkdir(parents=True)
    config = {"method": {"name": method}, "strategy": {"name": "ddp"}, "model": {"name": "tiny"},
              "trainer": {"lr": lr}, "hardware": {"gpu_hour_usd": price},
              "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1}, "logger": {"name": "none"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    summary = {"status": status, "error": None if status == "completed" else "RuntimeError: boom",
               "method": method, "strategy": "ddp", "model": "tiny", "num_workers": 2, "steps": 3, "lr": lr,
               "eval": {"gsm8k_accuracy": correct / n, "gsm8k_correct": correct, "num_examples": n,
                        "gsm8k_format_rate": 0.5, "eval_loss": eval_loss} if status == "completed" else None,
               "peak_memory_bytes": 3 * 2**30, "tokens_per_second": 123.4, "wall_seconds": 1800.0,
               "trainable_params": 1_500_000, "total_params": 10_000_000}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if status == "completed":
        (run_dir / "export").mkdir()
        (run_dir / "export" / "adapter_model.safetensors").write_bytes(b"x" * export_bytes)
        for step, size in ((2, 7), (3, ckpt_bytes)):  # the newest checkpoint is the one measured
            (run_dir / f"checkpoint_00000{step}").mkdir()
            (run_dir / f"checkpoint_00000{step}" / "model.pt").write_bytes(b"x" * size)
    return run_dir


def rows_by_arm(out_dir: Path) -> dict:
    return {r["arm"]: r for r in json.loads((out_dir / "report.json").read_text())}


def test_compare_dir_marks_failed_and_missing_arms(tmp_path):
    root = tmp_path / "cmp"
    make_run(root / "full", method="full", lr=1e-5, correct=1, n=10, price=2.0, ckpt_bytes=4096)
    final_eval = {"gsm8k_accuracy": 0.3, "gsm8k_correct": 3, "num_examples": 10, "gsm8k_format_rate": 0.5}
    (root / "full" / "eval_gsm8k.json").write_text(json.dumps(final_eval))  # compare.final_eval: replaces summary's
    make_run(root / "lora", method="lora", lr=1e-4, status="failed")
    arms = {name: {"run_dir": str(root / name), "status": st, "error": err} for name, st, err in
            (("full", "completed", None), ("lora", "failed", "RuntimeError: boom"),
             ("qlora", "failed", "ConfigError: bad"))}
    (root / "compare.json").write_text(json.dumps({"arms": arms}))

    report = write_report([root], wandb="off")

    assert report == root.resolve() / "report.md"
    rows = rows_by_arm(root)
    assert [r["status"] for r in rows.values()] == ["completed", "failed", "failed"]
    full = rows["full"]
    assert full["gsm8k_ci95"] == pytest.approx(list(wilson_interval(3, 10)))
    assert full["checkpoint_bytes"] == 4096 and full["export_bytes"] == 1000
    assert full["cost_usd"] == pytest.approx(2 * 0.5 * 2.0)  # 2 GPUs x 0.5 h x $2
    assert rows["qlora"]["error"] == "ConfigError: bad"  # never started: the compare's error is kept
    text = report.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "arm" not in line]
    assert len(table) == 3
    assert "| full | completed | 1e-05 | 0.300 [" in text and "(n=10)" in text and "$2.00" in text
    assert "| lora | failed |" in text and "| qlora | failed |" in text
    assert "RuntimeError: boom" in text and "ConfigError: bad" in text
    for png in ("loss_curves.png", "accuracy_vs_memory.png", "tokens_per_second.png"):
        assert (root / png).read_bytes()[:8] == PNG_MAGIC


def test_sweep_dir_picks_best_run_per_arm_and_lists_lrs(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00"
    make_run(sweep / "0-tiny-full-ddp", method="full", lr=1e-5, correct=2, eval_loss=1.0)
    make_run(sweep / "1-tiny-full-ddp", method="full", lr=2e-5, correct=2, eval_loss=0.9)  # tie: lower loss wins
    make_run(sweep / "2-tiny-lora-ddp", method="lora", lr=1e-4, correct=5)  # higher accuracy wins
    make_run(sweep / "3-tiny-lora-ddp", method="lora", lr=2e-4, correct=1)
    make_run(sweep / "4-tiny-qlora-ddp", method="qlora", lr=1e-4, status="failed")
    never_started = sweep / "5-tiny-qlora-ddp" / "hydra" / ".hydra"  # Hydra composed the job; no run followed
    never_started.mkdir(parents=True)
    (never_started / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "qlora"}, "model": {"name": "tiny"}}))
    (sweep / "multirun.yaml").write_text("{}")

    write_report([sweep], out_dir=tmp_path / "out", wandb="off")

    rows = rows_by_arm(tmp_path / "out")
    assert set(rows) == {"full", "lora", "qlora"}
    assert rows["full"]["lr"] == 2e-5 and rows["full"]["lrs_tried"] == [1e-5, 2e-5]
    assert rows["lora"]["lr"] == 1e-4 and rows["lora"]["gsm8k_correct"] == 5
    assert rows["qlora"]["status"] == "failed" and rows["qlora"]["runs"] == 2
    assert rows["full"]["cost_usd"] is None
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| full | completed | 2e-05 (1e-05, 2e-05) |" in text
    assert "| lora | completed | 0.0001 (0.0001, 0.0002) |" in text
    assert "n/a" in text


def test_cli_run_dirs_and_missing_dir(tmp_path, capsys):
    a = make_run(tmp_path / "a", method="full", lr=1e-5)
    b = make_run(tmp_path / "b", method="lora", lr=1e-4)
    assert main([str(a), str(b), str(tmp_path / "gone"), "--out", str(tmp_path / "rep"), "--wandb", "off"]) == 0
    rows = rows_by_arm(tmp_path / "rep")
    assert rows["gone"]["status"] == "missing"
    assert "| gone | missing |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "holds no run directories" in capsys.readouterr().err


def test_wandb_offline_gets_table_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = make_run(tmp_path / "runs" / "r", method="lora", lr=1e-4)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["logger"] = {"name": "wandb", "project": "distft-test", "group": "cmp"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    write_report([run], out_dir=tmp_path / "out", wandb="auto")

    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = list(runs[0].rglob("*.table.json")) + list(runs[0].rglob("*.png"))
    assert any(p.name.endswith(".table.json") for p in logged) and any(p.suffix == ".png" for p in logged)
