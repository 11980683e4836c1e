"""distft.report from synthetic run directories: rows, best-of-sweep, failed/missing rows, sizes, cost, plots, paired
tests, seeds, answers side by side, config diff, task metrics, the rank x lr grid and the W&B upload."""

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from distft.eval import wilson_interval
from distft.report import main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir: Path, *, method: str, lr: float, correct: int = 2, n: int = 8, eval_loss: float = 1.0,
             status: str = "completed", price: float | None = None, export_bytes: int = 1000,
             ckpt_bytes: int = 500, seed: int = 42, lora_r: int = 16, answers: list[bool] | None = None,
             base_answers: list[bool] | None = None, eval_extra: dict | None = None, logger: dict | None = None,
             write_config: bool = True) -> Path:
    """A run directory shaped like the ones distft.train writes. `answers` (and `base_answers`, the evaluation
    before training) write the per-question predictions files and set the summary's counts from them."""
    run_dir.mkdir(parents=True)
    config = {"method": {"name": method, "lora_r": lora_r}, "strategy": {"name": "ddp"}, "model": {"name": "tiny"},
              "trainer": {"lr": lr, "seed": seed}, "hardware": {"gpu_hour_usd": price},
              "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1},
              "logger": logger or {"name": "none", "group": None},
              "run": {"name": run_dir.name, "storage_path": str(run_dir.parent)}}
    if write_config:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    if answers is not None:
        correct, n = sum(answers), len(answers)
        write_predictions(run_dir / "eval_predictions.jsonl", answers, f"{method} says")
    summary = {"status": status, "error": None if status == "completed" else "RuntimeError: boom",
               "method": method, "strategy": "ddp", "model": "tiny", "num_workers": 2, "steps": 3, "lr": lr,
               "eval": {"gsm8k_accuracy": correct / n, "gsm8k_correct": correct, "num_examples": n,
                        "gsm8k_format_rate": 0.5, "eval_loss": eval_loss, **(eval_extra or {})}
               if status == "completed" else None,
               "peak_memory_bytes": 3 * 2**30, "tokens_per_second": 123.4, "wall_seconds": 1800.0,
               "trainable_params": 1_500_000, "total_params": 10_000_000}
    if base_answers is not None:
        write_predictions(run_dir / "eval_start_predictions.jsonl", base_answers, "base says")
        summary["eval_start"] = {"gsm8k_accuracy": sum(base_answers) / len(base_answers),
                                 "gsm8k_correct": sum(base_answers), "num_examples": len(base_answers),
                                 "gsm8k_format_rate": 0.1, "eval_loss": 2.5}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if status == "completed":
        (run_dir / "export").mkdir()
        (run_dir / "export" / "adapter_model.safetensors").write_bytes(b"x" * export_bytes)
        for step, size in ((2, 7), (3, ckpt_bytes)):  # the newest checkpoint is the one measured
            (run_dir / f"checkpoint_00000{step}").mkdir()
            (run_dir / f"checkpoint_00000{step}" / "model.pt").write_bytes(b"x" * size)
    return run_dir


def write_predictions(path: Path, answers: list[bool], says: str) -> None:
    """eval_predictions.jsonl as the eval writes it: one row per scored question, in index order."""
    rows = [{"index": i, "prompt": f"Question {i}?", "output": f"{says} {i}", "gold": str(i), "correct": ok,
             "gsm8k_formatted": True} for i, ok in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_by_arm(out_dir: Path) -> dict:
    return {r["arm"]: r for r in json.loads((out_dir / "report.json").read_text())}


def arm_table(text: str) -> list[list[str]]:
    """The cells of report.md's first table (the arms), header first."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def section(text: str, heading: str) -> str:
    """report.md's section under `## heading`, up to the next `## `."""
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


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
    assert len(arm_table(text)) == 1 + 3
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


def write_compare(root: Path, arms: dict[str, dict]) -> None:
    """compare.json as distft.compare writes it: run directories relative to the compare directory."""
    record = {n: {"run_dir": n, "status": "completed", "error": None, **a} for n, a in arms.items()}
    (root / "compare.json").write_text(json.dumps({"name": root.name, "arms": record}))


def test_paired_comparisons_base_model_row_and_verdicts(tmp_path):
    root = tmp_path / "cmp"
    base = [i < 3 for i in range(40)]
    make_run(root / "qlora", method="qlora", lr=1e-4, answers=[i < 28 or i == 35 for i in range(40)],
             base_answers=[False] * 40)  # eval_start of QLoRA scores the 4-bit base: not the one to report
    make_run(root / "full", method="full", lr=1e-5, answers=[i < 30 for i in range(40)], base_answers=base)
    make_run(root / "lora", method="lora", lr=1e-4, answers=[10 <= i < 20 for i in range(40)], base_answers=base)
    write_compare(root, {"qlora": {}, "full": {}, "lora": {}})

    text = write_report([root], wandb="off").read_text()

    rows = rows_by_arm(root)
    assert rows["base model"]["status"] == "base" and rows["base model"]["base_of"] == "full"
    assert rows["base model"]["accuracy"] == pytest.approx(3 / 40) and rows["base model"]["eval_loss"] == 2.5
    table = arm_table(text)
    assert [r[0] for r in table[1:]] == ["base model", "qlora", "full", "lora"]
    assert table[1][1] == "base model, before training (eval_start of full)" and table[1][12] == "—"
    paired = section(text, "Paired comparisons")
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in paired.splitlines()
             if line.startswith("| ") and not line.startswith("| A |")}
    assert len(lines) == 6  # 3 arms pairwise, then each against the base model
    # full vs lora: 20 questions only full got right, none the other way: exact p = 2 / 2^20
    assert "| full | lora | 40 | 0.750 | 0.250 | +0.500 | 20 | 0 | 1.91e-06 | full better (p=1.9e-06) |" in paired
    assert lines[("qlora", "full")].endswith("| 1 | 2 | 1 | too few questions differ to tell these arms apart; "
                                             "evaluate more (eval.gsm8k_examples / compare.final_eval_examples) |")
    assert "qlora better" in lines[("qlora", "lora")]
    assert "| 10 | 3 | 0.0923 | no detectable difference (p=0.092) |" in lines[("lora", "base model")]
    assert "McNemar" in paired and "b + c < 6" in paired
    answers = section(text, "Answers side by side")
    assert "| base model (before training; from arm full) | ✓ | base says 0 |" in answers
    assert answers.index("base model") < answers.index("| qlora |") < answers.index("| full |")
    assert "**Question 4.**" in answers and "**Question 5.**" not in answers  # compare.samples' default: 5


def test_seeds_give_mean_and_std_and_pool_seed_matched_pairs(tmp_path):
    root = tmp_path / "cmp"
    runs = {("full", 1): 30, ("full", 2): 26, ("lora", 1): 10, ("lora", 2): 14}
    for (arm, seed), k in runs.items():
        make_run(root / f"{arm}-seed{seed}", method=arm, lr=1e-4, seed=seed, answers=[i < k for i in range(40)])
    write_compare(root, {f"{a}-seed{s}": {"arm": a, "seed": s} for a, s in runs})

    text = write_report([root], wandb="off").read_text()

    rows = rows_by_arm(root)
    assert set(rows) == {"full", "lora"}
    assert rows["full"]["seed_accuracies"] == [[1, 0.75], [2, 0.65]]
    assert rows["full"]["accuracy_mean"] == pytest.approx(0.7)
    assert rows["full"]["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert rows["full"]["runs"] == 2 and rows["full"]["seed"] == 1  # the best seed's run is the row's run
    assert arm_table(text)[1][3] == "0.700 ± 0.071 (2 seeds, n=40 each)"
    paired = section(text, "Paired comparisons")
    # seed 1: full right on 0-29, lora on 0-9 (b=20); seed 2: 0-25 vs 0-13 (b=12); pooled b=32 over 80 pairs
    assert "| full | lora | 80 | 0.700 | 0.300 | +0.400 | 32 | 0 |" in paired
    assert "seeds 1, 2 pooled" in paired
    assert "trainer.seed" not in section(text, "Config differences between arms")
    assert "full (seed 1)" in section(text, "Answers side by side")
    assert (root / "accuracy_vs_memory.png").read_bytes()[:8] == PNG_MAGIC


def test_answers_side_by_side_escape_and_truncate(tmp_path):
    root = tmp_path / "cmp"
    make_run(root / "full", method="full", lr=1e-5, answers=[True, False, True])
    make_run(root / "lora", method="lora", lr=1e-4, answers=[False, True, True])
    rows = [{"index": 0, "prompt": "What is 1|2?\nThink.", "output": "a | b\nc <end>\n#### 3", "gold": "3",
             "correct": True},
            {"index": 1, "prompt": "Q1", "output": "x" * 1000, "gold": "1", "correct": False}]
    (root / "full" / "eval_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_compare(root, {"full": {}, "lora": {}})

    assert main([str(root), "--samples", "2", "--wandb", "off"]) == 0

    answers = section((root / "report.md").read_text(), "Answers side by side")
    assert "**Question 0.** What is 1\\|2?<br>Think." in answers and "**Question 2.**" not in answers
    assert "| full | ✓ | a \\| b<br>c &lt;end&gt;<br>#### 3 |" in answers
    assert "| lora | ✓ | lora says 1 |" in answers
    cut = next(line for line in answers.splitlines() if line.startswith("| full | ✗ |"))
    assert "x" * 400 + " … *(cut: 600 more characters)* |" in cut and "x" * 401 not in cut
    assert main([str(root), "--samples", "0", "--wandb", "off"]) == 0
    assert "## Answers side by side" not in (root / "report.md").read_text()


def test_config_diff_shows_only_keys_that_differ(tmp_path):
    root = tmp_path / "cmp"
    make_run(root / "full", method="full", lr=1e-5, logger={"name": "none", "group": "cmp-a"})
    make_run(root / "lora", method="lora", lr=1e-4, lora_r=64, logger={"name": "none", "group": "cmp-b"})
    cfg = yaml.safe_load((root / "lora" / "config.yaml").read_text())
    cfg["hydra"] = {"job": {"num": 3}}
    cfg["strategy"]["name"] = "zero3"
    del cfg["hardware"]
    (root / "lora" / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_compare(root, {"full": {}, "lora": {}})

    diff = section(write_report([root], wandb="off").read_text(), "Config differences between arms")

    assert "| key | full | lora |" in diff
    assert "| `method.lora_r` | 16 | 64 |" in diff and "| `trainer.lr` | 1e-05 | 0.0001 |" in diff
    assert "| `strategy.name` | ddp | zero3 |" in diff
    assert "| `hardware.gpu_hour_usd` | null | (not in this config) |" in diff
    for same_or_run_specific in ("model.name", "run.name", "run.storage_path", "logger.group", "hydra"):
        assert same_or_run_specific not in diff


def test_task_metric_names_the_column_and_lm_eval_columns(tmp_path):
    sql = {"task": "sql", "metric": "sql_exact_match", "accuracy": 0.25, "correct": 2, "num_examples": 8,
           "sql_exact_match": 0.25, "sql_execution_match": 0.5}
    a = make_run(tmp_path / "a", method="full", lr=1e-5, eval_extra=sql)
    b = make_run(tmp_path / "b", method="lora", lr=1e-4, eval_extra={**sql, "accuracy": 0.5, "correct": 4})
    text = write_report([a, b], out_dir=tmp_path / "sql", wandb="off").read_text()
    head, *cells = arm_table(text)
    assert head[3] == "SQL exact match [95% CI] (n)" and "lm-eval strict" not in head
    assert head[-1] == "SQL execution match" and cells[1][-1] == "0.500"  # the task's other metric, last
    assert cells[1][3].startswith("0.500 [") and rows_by_arm(tmp_path / "sql")["lora"]["metric"] == "sql_exact_match"

    gsm8k = {"task": "gsm8k", "metric": "gsm8k_accuracy", "accuracy": 0.25, "correct": 2,
             "gsm8k_strict_match": 0.125, "gsm8k_flexible_extract": 0.375}
    g = make_run(tmp_path / "g", method="qlora", lr=1e-4, eval_extra=gsm8k)
    text = write_report([a, g], out_dir=tmp_path / "mixed", wandb="off").read_text()
    head, *cells = arm_table(text)
    assert head[3] == "accuracy [95% CI] (n)"
    assert head[-3:] == ["lm-eval strict", "lm-eval flexible", "SQL execution match"]
    by_arm = {c[0]: c for c in cells}
    assert by_arm["full"][3].startswith("SQL exact match: 0.250 [") and by_arm["full"][-3:] == ["—", "—", "0.500"]
    assert by_arm["qlora"][3].startswith("GSM8K acc: 0.250 [") and by_arm["qlora"][-3:] == ["0.125", "0.375", "—"]
    row = rows_by_arm(tmp_path / "mixed")["qlora"]
    assert (row["lm_eval_strict"], row["lm_eval_flexible"], row["gsm8k_accuracy"]) == (0.125, 0.375, 0.25)


def test_final_eval_per_question_results_replace_the_in_run_ones(tmp_path):
    root = tmp_path / "cmp"
    make_run(root / "full", method="full", lr=1e-5, answers=[False] * 10)
    make_run(root / "lora", method="lora", lr=1e-4, answers=[False] * 10)
    for name, k in (("full", 9), ("lora", 1)):  # distft.eval on 20 questions: the report's figures come from here
        result = {"task": "gsm8k", "metric": "gsm8k_accuracy", "accuracy": k / 20, "correct": k,
                  "gsm8k_accuracy": k / 20, "gsm8k_correct": k, "num_examples": 20,
                  "outputs": [f"out {i}" for i in range(20)],
                  "per_example": [{"gold": str(i), "correct": i < k} for i in range(20)]}
        (root / name / "eval_gsm8k.json").write_text(json.dumps(result))
    write_compare(root, {"full": {}, "lora": {}})

    text = write_report([root], wandb="off").read_text()

    assert rows_by_arm(root)["full"]["accuracy"] == 0.45 and rows_by_arm(root)["full"]["n"] == 20
    assert "| full | lora | 20 | 0.450 | 0.050 | +0.400 | 8 | 0 | 0.00781 | full better (p=0.0078) |" in text
    assert "| full | ✓ | out 0 |" in section(text, "Answers side by side")


def test_rank_by_lr_grid_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    accs = {(8, 1e-4): 2, (8, 3e-4): 3, (64, 1e-4): 5, (64, 3e-4): 4}
    for i, ((r, lr), k) in enumerate(accs.items()):
        make_run(sweep / f"{i}-tiny-lora-ddp", method="lora", lr=lr, lora_r=r, correct=k)
    make_run(sweep / "4-tiny-full-ddp", method="full", lr=1e-5)

    text = write_report([sweep], out_dir=tmp_path / "out", wandb="off").read_text()

    rows = rows_by_arm(tmp_path / "out")
    assert rows["lora"]["lora_r"] == 64 and rows["lora"]["lr"] == 1e-4  # the best run still heads the arm's row
    grid = section(text, "Accuracy by LoRA rank and learning rate")
    assert "### lora (ddp, tiny)" in grid and "full" not in grid
    assert "| lora_r / lr | 0.0001 | 0.0003 |" in grid
    assert "| 8 | 0.250 | 0.375 |" in grid and "| 64 | 0.625 | 0.500 |" in grid
    assert (tmp_path / "out" / "accuracy_vs_rank.png").read_bytes()[:8] == PNG_MAGIC
    assert "![accuracy_vs_rank.png](accuracy_vs_rank.png)" in text


def test_compare_json_paths_relative_stale_absolute_and_recorded_config(tmp_path):
    root = tmp_path / "copied"  # e.g. committed under docs/: the recorded absolute paths are of another machine
    make_run(root / "full", method="full", lr=1e-5, write_config=False)
    make_run(root / "lora", method="lora", lr=1e-4)
    recorded = {"hardware": {"gpu_hour_usd": 3.0}, "scaling": {"num_workers": 1, "use_gpu": True},
                "method": {"name": "full"}, "trainer": {"lr": 1e-5}}
    arms = {"full": {"run_dir": "/elsewhere/cmp/full", "status": "completed", "error": None, "config": recorded},
            "lora": {"run_dir": "lora", "status": "completed", "error": None}}
    (root / "compare.json").write_text(json.dumps({"arms": arms}))

    write_report([root], wandb="off")

    rows = rows_by_arm(root)
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert rows["full"]["run_dir"] == str(root.resolve() / "full") and rows["lora"]["run_dir"].endswith("lora")
    assert rows["full"]["cost_usd"] == pytest.approx(1 * 0.5 * 3.0)  # no config.yaml: compare.json's config


def test_wandb_gets_tables_and_plots_in_the_runs_group(tmp_path, monkeypatch):
    logged = {}

    class FakeRun:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["finished"] = True

    def init(**kwargs):
        logged["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data),
                                 Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    root = tmp_path / "cmp"
    wandb_logger = {"name": "wandb", "project": "proj", "entity": "team", "group": "cmp-group", "mode": "offline"}
    for name, r in (("lora_r8", 8), ("lora_r64", 64)):
        make_run(root / name, method="lora", lr=1e-4, lora_r=r, answers=[i < r // 8 for i in range(10)],
                 logger=wandb_logger)
    write_compare(root, {"lora_r8": {}, "lora_r64": {}})

    write_report([root])

    assert logged["init"] == {"project": "proj", "entity": "team", "group": "cmp-group", "mode": "offline",
                              "job_type": "report", "name": "report-cmp-group", "dir": str(root.resolve()),
                              "reinit": "create_new"}
    kind, columns, data = logged["compare/table"]
    assert kind == "table" and columns[0] == "arm" and [r[0] for r in data] == ["lora_r8", "lora_r64"]
    assert logged["compare/paired"][2][0][:3] == ["lora_r8", "lora_r64", 10]
    assert logged["compare/rank_grid_0"][2] == [["lora (ddp, tiny)", 8, 1e-4, 0.1, 1],
                                                ["lora (ddp, tiny)", 64, 1e-4, 0.8, 1]]
    for plot in ("loss_curves", "accuracy_vs_memory", "tokens_per_second", "accuracy_vs_rank"):
        assert logged[f"compare/{plot}"] == ("image", str(root.resolve() / f"{plot}.png"))
    assert logged["finished"]
