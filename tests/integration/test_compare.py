"""Slow tier: the compare experiment, a Hydra multirun sweep and `python -m distft.eval`, on the tiny random Llama
with 2 Ray CPU workers per run (the session cluster has 4 CPUs, so two runs fit at once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distft.compare import run_compare
from tests.conftest import REPO, compose_cfg

pytestmark = pytest.mark.slow

TINY = ["model=tiny_llama", "hardware=cpu", "data.max_train_examples=64", "data.seq_len=384",
        "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.warmup_steps=1", "trainer.progress_bar=false",
        "eval.loss_examples=8", "eval.gsm8k_examples=4", "eval.max_new_tokens=8", "eval.at_start=false"]


def table_rows(report: Path) -> dict[str, list[str]]:
    """The arm table (the report's first table): arm -> cells."""
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line.strip("|").split("|") for line in lines[start:end] if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory, gsm8k_dir, ray_cluster) -> Path:
    root = tmp_path_factory.mktemp("compare")
    overrides = ["+experiment=gsm8k_compare", *TINY, f"run.storage_path={root}", f"data.path={gsm8k_dir}",
                 "compare.arms.full.lr=3e-3", "compare.arms.lora.lr=3e-2", "compare.arms.qlora.lr=3e-2",
                 "compare.final_eval=true", "compare.final_eval_examples=4", "eval.at_start=true"]
    record = run_compare(compose_cfg(overrides), overrides)
    assert record["max_concurrent"] == 2  # 4 CPUs, 2 per arm: two arms ran at once as Ray tasks
    return Path(record["compare_dir"])


def test_compare_runs_three_arms_and_reports(compare_dir):
    record = json.loads((compare_dir / "compare.json").read_text())
    assert {n: a["status"] for n, a in record["arms"].items()} == {"full": "completed", "lora": "completed",
                                                                  "qlora": "completed"}
    summaries = {n: json.loads((compare_dir / n / "summary.json").read_text()) for n in record["arms"]}
    for name, summary in summaries.items():
        assert summary["method"] == name and summary["steps"] == 4
        assert (compare_dir / name / "metrics.jsonl").exists() and (compare_dir / name / "export").is_dir()
        # compare.final_eval: distft.eval on the export (full model or adapter, 4-bit base for QLoRA) reproduces
        # the training-time generations exactly, so prompts, decoding and loading agree
        final = json.loads((compare_dir / name / "eval_gsm8k.json").read_text())
        assert final["num_examples"] == 4 and final["max_new_tokens"] == 8
        assert [s["output"] for s in final["samples"]] == [s["output"] for s in summary["eval"]["samples"]]
        assert final["gsm8k_format_rate"] == summary["eval"]["gsm8k_format_rate"]
    assert {n: s["lr"] for n, s in summaries.items()} == {"full": 3e-3, "lora": 3e-2, "qlora": 3e-2}
    # same data and token budget in every arm
    assert len({json.dumps(s["data"], sort_keys=True) for s in summaries.values()}) == 1

    # run directories relative to the compare directory, each arm's resolved config kept
    assert {a["run_dir"] for a in record["arms"].values()} == {"full", "lora", "qlora"}
    assert record["arms"]["lora"]["config"]["method"]["name"] == "lora"
    for name in record["arms"]:  # every scored question's output, before and after training
        for file in ("eval_predictions.jsonl", "eval_start_predictions.jsonl"):
            assert len((compare_dir / name / file).read_text().splitlines()) == 4

    report = (compare_dir / "report.md").read_text()
    for section in ("## Paired comparisons", "## Answers side by side", "## Config differences between arms"):
        assert section in report, section
    assert "method.name" in report  # the arms differ in method (and lr)
    rows = table_rows(compare_dir / "report.md")
    assert "base model" in " ".join(rows)  # the model before training, from eval_start
    rows = {k: v for k, v in rows.items() if "base model" not in k}
    assert set(rows) == {"full", "lora", "qlora"}
    for name, cells in rows.items():
        assert cells[1] == "completed"
        assert "(n=4)" in cells[3]
        assert float(cells[5]) == pytest.approx(summaries[name]["eval"]["eval_loss"], abs=1e-4)
        assert float(cells[7]) > 0  # tokens/s
        assert all(cells[i] not in ("—", "") for i in (6, 8, 9, 10, 11))  # memory, wall, params, ckpt, export
    full_params = float(rows["full"][9].split()[0]) * (1e6 if "M" in rows["full"][9] else 1e3)
    lora_params = float(rows["lora"][9].split()[0]) * (1e6 if "M" in rows["lora"][9] else 1e3)
    assert full_params > 10 * lora_params
    for png in ("loss_curves.png", "accuracy_vs_memory.png", "tokens_per_second.png"):
        assert (compare_dir / png).stat().st_size > 1000


def test_eval_cli_reproduces_training_time_accuracy(compare_dir, tmp_path):
    """`python -m distft.eval EXPORT_DIR` agrees with the training-time eval."""
    from distft.eval.__main__ import main

    out = tmp_path / "lora.json"
    assert main([str(compare_dir / "lora" / "export"), "--examples", "3", "--workers", "1", "--batch-size", "2",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    trained = json.loads((compare_dir / "lora" / "summary.json").read_text())["eval"]
    assert result["num_examples"] == 3 and result["max_new_tokens"] == 8  # taken from the run's config
    assert [s["output"] for s in result["samples"]] == [s["output"] for s in trained["samples"]]
    assert main([str(tmp_path), "--examples", "0"]) == 2  # not an export, bad count: both reported


def test_multirun_sweep_gives_each_job_a_run_and_report_picks_best(tmp_path, gsm8k_dir, ray_cluster):
    """`python -m distft.train -m hydra/launcher=ray_tasks method=full,lora trainer.lr=A,B ...` joining the session's
    Ray cluster (RAY_ADDRESS), where the four jobs' trainers run two at a time."""
    import ray

    from distft.report import write_report

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "distft.train", "-m", "hydra/launcher=ray_tasks", "method=full,lora",
           "trainer.lr=1e-3,3e-3", *TINY, f"data.path={gsm8k_dir}", f"run.storage_path={tmp_path}", "run.export=false",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0-tiny_llama-full-ddp", "1-tiny_llama-full-ddp", "2-tiny_llama-lora-ddp",
                                      "3-tiny_llama-lora-ddp"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
    assert [s["status"] for s in summaries] == ["completed"] * 4
    assert [s["lr"] for s in summaries] == [1e-3, 3e-3, 1e-3, 3e-3]
    import yaml

    assert {yaml.safe_load((p / "config.yaml").read_text())["logger"]["group"] for p in runs} == {"sweep"}

    write_report([sweep], wandb="off")
    rows = {r["arm"]: r for r in json.loads((sweep / "report.json").read_text())}
    assert set(rows) == {"full", "lora"}
    for arm, pair in (("full", summaries[:2]), ("lora", summaries[2:])):
        best = max(pair, key=lambda s: (s["eval"]["gsm8k_accuracy"], -s["eval"]["eval_loss"]))
        assert rows[arm]["runs"] == 2 and rows[arm]["lrs_tried"] == [1e-3, 3e-3]
        assert rows[arm]["lr"] == best["lr"] and rows[arm]["run_dir"] == best["run_dir"]
    assert "(0.001, 0.003)" in (sweep / "report.md").read_text()
