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
