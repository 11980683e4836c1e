"""The per-worker recipe end to end in one process (world size 1, no Ray): the files a run writes, the checkpoints it
hands over, and a resume from one of them that continues the loss curve exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from distft.checkpoint import check_checkpoint
from distft.recipe import RunHooks, WorkerContext, run_training
from distft.tracking import read_metrics
from tests.conftest import compose_cfg, sql_rows, tiny_model_dir, viggo_rows, write_task_dir

STEPS = 4


def _cfg(data_path: Path, *overrides: str):
    return compose_cfg(["+experiment=gsm8k_lora", "model=tiny_llama", "hardware=cpu", f"data.path={data_path}",
                        "scaling.num_workers=1", "data.max_train_examples=48", "data.seq_len=384",
                        f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=2", "trainer.warmup_steps=1",
                        "trainer.lr=1e-2", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                        "trainer.progress_bar=false", "eval.loss_examples=8", "eval.gsm8k_examples=2",
                        "eval.max_new_tokens=4", *overrides])


def _keep_checkpoints(into: Path):
    """A `report` hook that keeps each checkpoint directory it is handed (Ray Train would copy it to storage)."""
    reported = []

    def report(metrics: dict, ckpt_dir: Path, step: int) -> None:
        reported.append((step, metrics))
        shutil.copytree(ckpt_dir, into / f"checkpoint_{step:06d}")

    return report, reported


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, gsm8k_dir):
    root = tmp_path_factory.mktemp("recipe")
    run_dir, ckpts = root / "run", root / "ckpts"
    run_dir.mkdir()
    ckpts.mkdir()
    report, reported = _keep_checkpoints(ckpts)
    uploaded = []
    result = run_training(_cfg(gsm8k_dir), WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir()),
                          RunHooks(report=report, sync=lambda *names: uploaded.extend(names)))
    return {"run_dir": run_dir, "ckpts": ckpts, "result": result, "reported": reported, "uploaded": uploaded}


def test_one_process_run_writes_metrics_results_eval_and_a_verified_export(full_run):
    run_dir, result = full_run["run_dir"], full_run["result"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["answer_tokens"] > 0 for r in rows)
    assert json.loads((run_dir / "train_result.json").read_text()) == json.loads(json.dumps(result, default=str))
    assert result["steps"] == STEPS and result["grad_accum"] == 2 and result["lr"] == 1e-2
    assert result["eval"]["eval_loss"] < result["eval_start"]["eval_loss"]  # it learned something
    assert result["eval"]["num_examples"] == 2 and (run_dir / "eval_start.json").exists()
    for name in ("eval_start", "eval"):  # distft's strict #### accuracy beside lm-eval's two GSM8K metrics
        assert {"task", "accuracy", "gsm8k_accuracy", "gsm8k_strict_match", "gsm8k_flexible_extract"} <= \
            result[name].keys()
        assert len((run_dir / f"{name}_predictions.jsonl").read_text().splitlines()) == 2
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["export_check"]["ok"] and (run_dir / "export" / "adapter_config.json").exists()
    assert (run_dir / "export_probe.pt").exists()
    assert set(result["peak_memory_bytes_by_phase"]) >= {"load", "prepare", "train", "save", "eval", "export"}
    assert result["tokens_per_second"] > 0
    # the upload hook saw every file of the run directory that a cloud copy needs
    assert {"metrics.jsonl", "train_result.json", "eval_start.json", "eval_start_predictions.jsonl",
            "eval_predictions.jsonl", "export_probe.pt", "export"} <= set(full_run["uploaded"])


def test_checkpoints_are_handed_over_on_schedule_and_complete(full_run):
    assert [(step, m["step"]) for step, m in full_run["reported"]] == [(2, 2), (4, 4)]
    for step in (2, 4):
        assert check_checkpoint(full_run["ckpts"] / f"checkpoint_{step:06d}") is None


def test_resume_from_a_checkpoint_continues_the_identical_curve(full_run, tmp_path, gsm8k_dir, monkeypatch):
    """Also with the training rows handed over as the driver's input check built them (distft.launch puts them in
    Ray's object store): the workers do not build them again, and they are the same rows."""
    from distft import recipe
    from distft.precheck import check_inputs

    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    # the interrupted run's metrics up to its checkpoint, as a restarted worker would find them
    shutil.copy(full_run["run_dir"] / "metrics.jsonl", run_dir / "metrics.jsonl")
    ckpt = full_run["ckpts"] / "checkpoint_000002"
    cfg = _cfg(gsm8k_dir, "eval.enabled=false", "run.export=false")
    checked = check_inputs(cfg, tiny_model_dir(), joins_cluster=False)

    def built_again(*args, **kwargs):
        raise AssertionError("the worker built the training rows the driver handed over")

    monkeypatch.setattr(recipe, "training_rows", built_again)
    result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir(), resume_dir=ckpt,
                                             train_rows=checked.train))
    assert result["resumed_from"] == str(ckpt) and result["steps"] == STEPS
    resumed = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    original = {r["step"]: r["loss"] for r in read_metrics(full_run["run_dir"] / "metrics.jsonl")}
    assert resumed == original  # exact on CPU, keyed by step


def test_a_stop_request_checkpoints_at_the_step_boundary_and_returns_stopped(tmp_path, gsm8k_dir):
    report, reported = _keep_checkpoints(tmp_path)
    def should_stop():  # asked once a step has been logged
        return "SIGTERM received by a test" if (tmp_path / "metrics.jsonl").exists() else None

    result = run_training(_cfg(gsm8k_dir, "eval.enabled=false", "run.export=false"),
                          WorkerContext(run_dir=tmp_path, model_dir=tiny_model_dir()),
                          RunHooks(report=report, should_stop=should_stop))
    assert result == {"steps": 1, "max_steps": STEPS, "stopped": "SIGTERM received by a test",
                      "stopped_phase": "training", "resumed_from": None}
    assert [step for step, _ in reported] == [1]
    assert check_checkpoint(tmp_path / "checkpoint_000001") is None


# --- a stop request outside the steps: prompt, and nothing that a rerun cannot redo is lost ---------------------

def _stop_when(flag: list):
    return lambda: "SIGTERM received by a test" if flag else None


def test_a_stop_while_loading_ends_the_run_before_the_first_step(tmp_path, gsm8k_dir):
    report, reported = _keep_checkpoints(tmp_path)
    result = run_training(_cfg(gsm8k_dir), WorkerContext(run_dir=tmp_path, model_dir=tiny_model_dir()),
                          RunHooks(report=report, should_stop=_stop_when([True])))
    assert result == {"steps": 0, "stopped": "SIGTERM received by a test", "stopped_phase": "loading",
                      "resumed_from": None}
    assert reported == [] and not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "train_result.json").read_text()) == result


def test_a_stop_during_the_evaluation_before_training_ends_it_after_one_batch(tmp_path, gsm8k_dir, monkeypatch):
    """The evaluation at the start used to run to its end (and then a whole step) before a SIGTERM took effect."""
    import distft.eval.evaluate as evaluate

    batches = []
    real = evaluate.causal_lm_loss_sum
    monkeypatch.setattr(evaluate, "causal_lm_loss_sum", lambda *a, **k: (batches.append(1), real(*a, **k))[1])
    result = run_training(_cfg(gsm8k_dir, "eval.loss_examples=32", "eval.at_start=true"),
                          WorkerContext(run_dir=tmp_path, model_dir=tiny_model_dir()),
                          RunHooks(should_stop=_stop_when(batches)))
    assert len(batches) == 1  # of 16 loss batches
    assert result["stopped_phase"] == "evaluation" and result["steps"] == 0
    assert not (tmp_path / "eval_start.json").exists() and read_metrics(tmp_path / "metrics.jsonl") == []


def test_a_stop_during_generation_ends_it_at_the_next_prompt_batch(tmp_path, gsm8k_dir, monkeypatch):
    import distft.eval.evaluate as evaluate

    generated = []
    real = evaluate.greedy_generate

    def counting(*args, on_batch, **kwargs):
        return real(*args, on_batch=lambda: (generated.append(1), on_batch()), **kwargs)

    monkeypatch.setattr(evaluate, "greedy_generate", counting)
    result = run_training(_cfg(gsm8k_dir, "eval.loss_examples=2", "eval.gsm8k_examples=8", "eval.batch_size=1",
                               "eval.at_start=true"),
                          WorkerContext(run_dir=tmp_path, model_dir=tiny_model_dir()),
                          RunHooks(should_stop=_stop_when(generated)))
    assert len(generated) == 1  # of 8 prompts, one per batch
    assert result["stopped_phase"] == "evaluation" and result["steps"] == 0


def test_a_stop_during_export_keeps_the_last_checkpoint_and_a_rerun_finishes(tmp_path, gsm8k_dir, monkeypatch):
    """After the last step its checkpoint exists: a stop in the export removes the half-written export, and
    resuming from that checkpoint redoes the export without training again."""
    import distft.export as export

    run_dir, ckpts = tmp_path / "run", tmp_path / "ckpts"
    run_dir.mkdir()
    ckpts.mkdir()
    report, reported = _keep_checkpoints(ckpts)
    exporting = []
    real = export.export_model
    monkeypatch.setattr(export, "export_model", lambda *a, **k: (exporting.append(1), real(*a, **k))[1])
    cfg = _cfg(gsm8k_dir, "eval.enabled=false")
    result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir()),
                          RunHooks(report=report, should_stop=_stop_when(exporting)))
    assert result == {"steps": STEPS, "stopped": "SIGTERM received by a test", "stopped_phase": "export",
                      "resumed_from": None}
    assert exporting == [1] and not (run_dir / "export").exists() and not (run_dir / "export_probe.pt").exists()
    assert [step for step, _ in reported] == [2, STEPS]
    curve = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}

    last = ckpts / f"checkpoint_{STEPS:06d}"
    rerun = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir(), resume_dir=last))
    assert rerun["steps"] == STEPS and rerun["resumed_from"] == str(last)
    assert rerun["export_check"]["ok"] and (run_dir / "export" / "adapter_config.json").exists()
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")} == curve  # no step trained again


@pytest.mark.parametrize("task,rows", [("sql", sql_rows), ("viggo", viggo_rows)])
def test_each_task_is_scored_by_its_own_metric_before_and_after_training(task, rows, tmp_path):
    data = write_task_dir(tmp_path / "data", rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _cfg(data, f"data={task}", "data.seq_len=256", "eval.at_start=true", "eval.gsm8k_examples=3",
               "eval.fewshot=2", "run.export=false")
    result = run_training(cfg, WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir()))
    metric = {"sql": "sql_exact_match", "viggo": "viggo_exact_match"}[task]
    for name in ("eval_start", "eval"):
        scores = result[name]
        assert scores["task"] == task and scores["metric"] == metric and scores["num_examples"] == 3
        assert scores["accuracy"] == scores[metric] and "predictions" not in scores  # the outputs have their own file
        written = [json.loads(line) for line in (run_dir / f"{name}_predictions.jsonl").read_text().splitlines()]
        test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
        assert [p["index"] for p in written] == [0, 1, 2]
        # the question asked is the test row's own (the few-shot exemplars come before it, from train)
        key = "question" if task == "sql" else "target"
        assert all(test[i][key] in p["prompt"] for i, p in enumerate(written))
        assert all(isinstance(p["correct"], bool) and isinstance(p["output"], str) for p in written)
        assert sum(p["correct"] for p in written) == scores["correct"]


def test_bitsandbytes_optimizers_train_and_paged_32bit_follows_torch_adamw(gsm8k_dir, tmp_path):
    """trainer.optimizer (the QLoRA recipe's paged AdamW), on full fine-tuning so that some tensors are large enough
    for bitsandbytes' 8-bit states (>= 4096 elements): the 32-bit paged optimizer takes AdamW's steps, the 8-bit
    one its own (quantised moments), and both train."""
    pytest.importorskip("bitsandbytes")
    curves = {}
    for name in ("adamw", "paged_adamw_32bit", "adamw_8bit"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        run_training(_cfg(gsm8k_dir, "method=full", "trainer.lr=1e-3", f"trainer.optimizer={name}",
                          "eval.enabled=false", "run.export=false"),
                     WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir()))
        curves[name] = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert curves["paged_adamw_32bit"] == pytest.approx(curves["adamw"], rel=1e-4)  # on CPU it is not paged
    eight = curves["adamw_8bit"]
    assert eight[STEPS] < eight[1] and eight != curves["adamw"]


def test_chunked_loss_trains_the_same_steps(full_run, gsm8k_dir, tmp_path):
    """trainer.loss_chunk_tokens: the same gradients, hence the same updates (grad norms bit-identical); the logged
    loss may differ in the last bits, from summing the chunks."""
    run_dir = tmp_path / "chunked"
    run_dir.mkdir()
    run_training(_cfg(gsm8k_dir, "trainer.loss_chunk_tokens=64", "eval.enabled=false", "run.export=false"),
                 WorkerContext(run_dir=run_dir, model_dir=tiny_model_dir()))
    chunked = read_metrics(run_dir / "metrics.jsonl")
    whole = read_metrics(full_run["run_dir"] / "metrics.jsonl")
    assert [r["grad_norm"] for r in chunked] == [r["grad_norm"] for r in whole]
    assert [r["loss"] for r in chunked] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
