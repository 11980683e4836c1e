"""What reaches the console: a worker's user error as one message, Ray's harmless noise dropped, real errors kept."""

import logging
import pickle

from ray.exceptions import GetTimeoutError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from distft import console
from distft.errors import DataError, WorkerUserError
from distft.launch import user_error_message


def _group_error(*failures: BaseException) -> WorkerGroupError:
    return WorkerGroupError("snippets", {rank: UserExceptionWithTraceback(e, "Traceback ...")
                                         for rank, e in enumerate(failures)})


def test_a_worker_user_error_keeps_message_rank_and_log_across_pickling_and_its_traceback_goes_to_the_log(tmp_path):
    try:
        raise DataError("train.jsonl:3: invalid JSON (write one JSON object per line)")
    except DataError as e:
        error = console.worker_user_error(e, rank=1, run_dir=tmp_path)
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.rank, back.log) == (str(error), 1, str(tmp_path / "logs" / "worker-rank1.log"))
    assert "Traceback" in (tmp_path / "logs" / "worker-rank1.log").read_text()


def test_only_a_group_error_made_of_user_errors_counts_as_the_users():
    user = [WorkerUserError("bad row", rank=0, log="/r/logs/worker-rank0.log"),
            WorkerUserError("bad row", rank=1, log="/r/logs/worker-rank1.log")]
    assert console.user_errors(_group_error(*user)) == user
    assert console.user_errors(_group_error(user[0], RuntimeError("a bug"))) is None
    assert console.user_errors(RuntimeError("a bug")) is None
    assert user_error_message(user) == "bad row\n(found on worker ranks 0, 1; traceback in /r/logs/)"


def _record(logger: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc else None)


def test_ray_logging_of_user_errors_and_timeouts_is_dropped_and_everything_else_kept():
    console.quiet_ray_processes()

    def shown(record):
        return logging.getLogger(record.name).filter(record)

    worker = console.RAY_WORKER_ERROR_LOGGER
    assert not shown(_record(worker, "Error in training function:\nTraceback\ndistft.errors.WorkerUserError: bad"))
    assert shown(_record(worker, "Error in training function:\nTraceback\nZeroDivisionError: division by zero"))
    policy = console.RAY_FAILURE_POLICY_LOGGER
    assert not shown(_record(policy, "[FailurePolicy] RAISE", _group_error(WorkerUserError("bad", 0))))
    assert shown(_record(policy, "[FailurePolicy] RAISE", _group_error(ZeroDivisionError("x"))))
    scaling = console.RAY_AUTOSCALING_LOGGER
    assert not shown(_record(scaling, "Failed to send resource request", GetTimeoutError("slow")))
    assert shown(_record(scaling, "Failed to send resource request", ConnectionError("gone")))


def test_a_choice_that_needs_a_missing_extra_names_the_extra(monkeypatch):
    from distft import command_line

    monkeypatch.setattr(command_line, "EXTRAS", (("hydra/launcher=ray_tasks", "no_such_plugin.launcher", "sweep"),))
    assert command_line.missing_extra(["-m", "hydra/launcher=ray_tasks", "method=full,lora"]) == \
        "hydra/launcher=ray_tasks needs the 'sweep' extra: `pip install 'distft[sweep]'`"
    assert command_line.missing_extra(["-m", "method=full,lora"]) is None


def test_progress_says_start_at_most_one_line_per_interval_and_done(caplog, monkeypatch):
    import distft.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="distft.progress"):
        with progress.Progress("evaluation: eval loss", 10, unit="batches", every=30) as p:
            for _ in range(10):
                clock[0] += 10
                p.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "evaluation: eval loss: 10 batches"
    assert lines[1] == "evaluation: eval loss: 3/10 batches (30%), 30 s, about 1 min 10 s left"
    assert len(lines) == 5 and lines[-1] == "evaluation: eval loss: done in 1 min 40 s"
    assert progress.plural("batches", 1) == "batch" and progress.plural("prompts", 1) == "prompt"


def test_the_end_of_a_run_is_a_short_before_after_table():
    from distft.summary import outcome_table

    def ev(loss, formatted, correct):
        return {"eval_loss": loss, "eval_loss_examples": 32, "gsm8k_accuracy": correct / 32,
                "gsm8k_format_rate": formatted / 32, "gsm8k_correct": correct, "gsm8k_formatted": formatted,
                "num_examples": 32, "samples": [{"question": "q", "output": "a long generation " * 50}]}

    summary = {"status": "completed", "run_name": "quick", "wall_seconds": 312.0, "steps": 32,
               "train_loss_first": 1.3944, "train_loss_last": 1.0682, "tokens_per_second": 131.04,
               "eval_start": ev(1.4336, 7, 1), "eval": ev(1.0456, 17, 0), "run_dir": "runs/quick",
               "export_dir": "runs/quick/export", "export_check": {"ok": True, "max_abs_logit_diff": 1.2e-6}}
    table = outcome_table(summary)
    assert table.splitlines() == [
        "distft: completed quick in 5 min 12 s: 32 steps, train loss 1.3944 → 1.0682, 131 tokens/s",
        "                          before     after",
        "  eval loss               1.4336    1.0456   (32 examples)",
        "  GSM8K format rate        21.9%     53.1%   (32 examples)",
        "  GSM8K accuracy            3.1%      0.0%   (32 examples; after: 95% CI 0.0%–10.7%)",
        "  export: runs/quick/export (reloaded and checked: max |logit diff| 1.2e-06)",
        "  summary: runs/quick/summary.json"]
    assert "long generation" not in table
    bare = outcome_table({**summary, "eval": None, "eval_start": None, "export_dir": None,
                          "train_loss_last": None, "tokens_per_second": None})
    assert bare.splitlines() == ["distft: completed quick in 5 min 12 s: 32 steps", "  summary: runs/quick/summary.json"]


def test_a_stopped_run_says_what_a_rerun_does():
    from distft.train import stopped_message

    base = {"error": "SIGTERM received by the driver"}
    assert "before the first step (nothing to save)" in stopped_message({**base, "steps": 0,
                                                                          "stopped_phase": "evaluation"})
    assert stopped_message({**base, "steps": 3, "stopped_phase": "training"}) == \
        "stopped (SIGTERM received by the driver) after a checkpoint; rerun the same command to resume"
    assert "during export; the checkpoint of step 8 is kept" in stopped_message({**base, "steps": 8,
                                                                                 "stopped_phase": "export"})


def test_the_driver_drops_rays_known_harmless_forwarded_lines_and_keeps_the_rest():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed, saved = [], list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        console.drop_forwarded_noise()
        console.drop_forwarded_noise()  # idempotent: one filter, not two
        noise = ("[2026-12-03 13:25:33,874 E 7774 7853] core_worker.cc:2465: Actor with class name: "
                 "'PreemptionWatcher' and ID: '01a9' has constructor arguments in the object store and "
                 "max_restarts > 0. If the arguments ...")
        dispatcher.emit({"lines": [noise], "pid": 1, "is_err": True})
        dispatcher.emit({"lines": [noise, "Traceback (most recent call last):"], "pid": 2, "is_err": True})
    finally:
        dispatcher.handlers = saved
    assert printed == [{"lines": ["Traceback (most recent call last):"], "pid": 2, "is_err": True}]
