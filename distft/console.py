"""What a user sees on the console: a worker's UserError arrives as one message (its traceback goes to the run's
log file), and Ray's known-harmless noise is dropped. Real errors keep their tracebacks."""

import logging
import sys
import traceback
from pathlib import Path

from distft.errors import UserError, WorkerUserError

# Ray Train logs a training function's exception (with its traceback) in the worker, then again in the controller.
RAY_WORKER_ERROR_LOGGER = "ray.train.v2._internal.util"
RAY_FAILURE_POLICY_LOGGER = "ray.train.v2._internal.execution.failure_handling.default"
# A busy machine makes this request time out; Ray's own message says it is safe to ignore, with a traceback.
RAY_AUTOSCALING_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
RAY_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def worker_user_error(error: UserError, *, rank: int, run_dir: Path) -> WorkerUserError:
    """The error to raise from a worker in place of `error`: its full traceback goes to
    `run_dir/logs/worker-rank{rank}.log`, the console gets the message."""
    log = Path(run_dir) / "logs" / f"worker-rank{rank}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:  # an unwritable run directory must not hide the user's error
        log = None
    return WorkerUserError(str(error), rank=rank, log=str(log) if log else None)


def user_errors(error: BaseException) -> list[WorkerUserError] | None:
    """The workers' user errors inside Ray's WorkerGroupError when every failed rank raised one, else None."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return None
    found = [root_cause(e) for _, e in sorted(failures.items())]
    return found if all(isinstance(e, WorkerUserError) for e in found) else None


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception: Ray nests the worker's error inside its own."""
    seen = error
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__ or getattr(seen, "_base_exc", None)
        if nxt is None or nxt is seen:
            return seen
        seen = nxt


class _DropUserErrors(logging.Filter):
    """Drop Ray's logging of an exception that is a distft user error (the driver prints its message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and user_errors(record.exc_info[1]):
            return False
        return f"{WorkerUserError.__module__}.{WorkerUserError.__name__}: " not in record.getMessage()


class _DropTimeoutTraceback(logging.Filter):
    """Drop the autoscaling coordinator's 'safe to ignore' timeout warning; keep any other failure of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and type(exc).__name__ == "GetTimeoutError")


def quiet_ray_processes() -> None:
    """In every Ray worker process of a distft job (the setup hook): the filters above."""
    logging.getLogger(RAY_WORKER_ERROR_LOGGER).addFilter(_DropUserErrors())
    logging.getLogger(RAY_FAILURE_POLICY_LOGGER).addFilter(_DropUserErrors())
    logging.getLogger(RAY_AUTOSCALING_LOGGER).addFilter(_DropTimeoutTraceback())


def quiet_local_driver() -> None:
    """Before starting a local cluster: its token authentication is on by default and needs no warning."""
    logging.getLogger(RAY_TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)


def show_progress() -> None:
    """On the driver: the progress lines of long steps (distft.progress) on stderr, as `distft: ...`."""
    logger = logging.getLogger("distft.progress")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("distft: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# Lines Ray prints from its own processes on every run, with nothing for a user to do.
HARMLESS_FORWARDED = (
    # Ray Train's PreemptionWatcher actor, from the controller's core worker (ray-project/ray#53727)
    "has constructor arguments in the object store and max_restarts > 0",
)


def drop_forwarded_noise() -> None:
    """On the driver, after ray.init: the worker output Ray prints here leaves out HARMLESS_FORWARDED lines.
    (Ray's private dispatcher of forwarded output; if it is not there, nothing changes.)"""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [(name, _without_noise(handle) if name == "ray_print_logs" else handle)
                                   for name, handle in dispatcher.handlers]
    except (ImportError, AttributeError, TypeError, ValueError):
        return


def _without_noise(handle):
    if getattr(handle, "drops_noise", False):
        return handle

    def filtered(data):
        lines = data.get("lines")
        if lines:
            kept = [line for line in lines if not any(noise in line for noise in HARMLESS_FORWARDED)]
            if not kept:
                return
            data = {**data, "lines": kept}
        handle(data)

    filtered.drops_noise = True
    return filtered
