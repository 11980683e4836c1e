"""Slow tier: the compare experiment, a Hydra multirun sweep and `python -m distft.eval`, on the tiny random Llama
with 2 Ray CPU workers per run (the session cluster has 4 CPUs, so two runs fit at once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distft.compare import run_compare
from tests.conftest import REPO, compose_cfg, sql_rows, viggo_rows, write_task_dir

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


def test_lora_sweep_preset_as_a_two_by_two_grid_through_ray_reports_accuracy_by_rank_and_lr(
        tmp_path, gsm8k_dir, ray_cluster):
    """`python -m distft.train -m +experiment=lora_sweep method.lora_r=8,64 trainer.lr=A,B ...` (the preset's Ray
    sweep launcher, joining the session's Ray cluster through RAY_ADDRESS, two trainers at a time): every job a run,
    one W&B group, and the report's best setting and rank x learning-rate grid."""
    import ray
    import yaml

    from distft.report import RANK_PLOT, write_report

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "distft.train", "-m", "+experiment=lora_sweep", "method.lora_r=8,64",
           "trainer.lr=1e-3,3e-3", *TINY, f"data.path={gsm8k_dir}", f"run.storage_path={tmp_path}", "run.export=false",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == [f"{i}-tiny_llama-lora-ddp" for i in range(4)]
    summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
    configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in runs]
    assert [s["status"] for s in summaries] == ["completed"] * 4
    assert [(c["method"]["lora_r"], s["lr"]) for c, s in zip(configs, summaries, strict=True)] == [
        (8, 1e-3), (8, 3e-3), (64, 1e-3), (64, 3e-3)]
    assert {c["method"]["lora_alpha"] for c in configs} == {32}  # alpha fixed across ranks, as the preset says
    assert {c["logger"]["group"] for c in configs} == {"sweep"}

    write_report([sweep], wandb="off")
    rows = {r["arm"]: r for r in json.loads((sweep / "report.json").read_text())}
    assert set(rows) == {"lora"}
    best = max(summaries, key=lambda s: (s["eval"]["gsm8k_accuracy"], -s["eval"]["eval_loss"]))
    assert rows["lora"]["runs"] == 4 and rows["lora"]["lrs_tried"] == [1e-3, 3e-3]
    assert rows["lora"]["run_dir"] == best["run_dir"]
    report = (sweep / "report.md").read_text()
    grid = report.split("## Accuracy by LoRA rank and learning rate")[1].split("\n## ")[0]
    lines = [line for line in grid.splitlines() if line.startswith("| ")]
    assert lines[0].split("|")[1:4] == [" lora_r / lr ", " 0.001 ", " 0.003 "]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in lines[1:]}
    expected = {str(c["method"]["lora_r"]): {} for c in configs}
    for c, s in zip(configs, summaries, strict=True):
        expected[str(c["method"]["lora_r"])][s["lr"]] = f"{s['eval']['gsm8k_accuracy']:.3f}"
    assert cells == {r: [by_lr[1e-3], by_lr[3e-3]] for r, by_lr in expected.items()}
    assert (sweep / RANK_PLOT).stat().st_size > 1000


@pytest.mark.nightly
@pytest.mark.parametrize("task,rows,label,other", [
    ("sql", sql_rows, "SQL exact match", "SQL execution match"),
    ("viggo", viggo_rows, "ViGGO exact match", "ViGGO function match")])
def test_task_compare_reports_its_own_metrics_paired_tests_and_answers(task, rows, label, other, tmp_path,
                                                                       ray_cluster):
    """`+experiment=sql_compare` / `viggo_compare` (the three arms of gsm8k_compare on another task) on rows in the
    dataset's real schema: the report's accuracy is the task's metric, its other metric is a column, and the paired
    tests and side-by-side answers read the task's per-question verdicts."""
    data = write_task_dir(tmp_path / "data", rows, train=48, test=8)
    overrides = [f"+experiment={task}_compare", *TINY, f"run.storage_path={tmp_path}", f"data.path={data}",
                 "data.seq_len=256", "eval.at_start=true", "compare.arms.full.lr=3e-3", "compare.arms.lora.lr=3e-2",
                 "compare.arms.qlora.lr=3e-2"]
    record = run_compare(compose_cfg(overrides), overrides)
    compare_dir = Path(record["compare_dir"])
    assert {n: a["status"] for n, a in record["arms"].items()} == dict.fromkeys(("full", "lora", "qlora"),
                                                                               "completed")
    for name in record["arms"]:
        summary = json.loads((compare_dir / name / "summary.json").read_text())
        assert summary["eval"]["task"] == task and summary["eval"]["num_examples"] == 4
        predictions = [json.loads(line) for line in (compare_dir / name / "eval_predictions.jsonl").open()]
        assert sum(p["correct"] for p in predictions) == summary["eval"]["correct"]

    report = (compare_dir / "report.md").read_text()
    head = report.splitlines()[next(i for i, line in enumerate(report.splitlines()) if line.startswith("| "))]
    assert f"{label} [95% CI] (n)" in head and head.rstrip(" |").endswith(other)
    assert "lm-eval strict" not in head
    for section in ("## Paired comparisons", "## Answers side by side", "## Config differences between arms"):
        assert section in report, section
    rows_ = table_rows(compare_dir / "report.md")
    assert any("base model" in arm for arm in rows_) and {"full", "lora", "qlora"} <= set(rows_)
    assert all("(n=4)" in cells[3] for cells in rows_.values())
