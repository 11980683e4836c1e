"""Stop requests (SIGTERM, a preemption notice): save a checkpoint at the next step boundary, then exit cleanly.

Who receives SIGTERM on a real preemption depends on the scheduler, so both ends listen:

- the **driver** (`python -m distft.train`): `ray job stop`, SLURM's `--signal`/`scancel` forwarded by
  launch/slurm.sbatch, a Kubernetes pod deletion of the submitter. Its handler sets a flag in a small named Ray
  actor that every rank polls (`stop_requests`).
- the **workers** (VM shutdown, SLURM signalling every task of the step): Ray's own worker handler exits at once,
  so `setup_worker_process` (a Ray `worker_process_setup_hook`) replaces it, for training workers only, with one
  that sets a flag in the process.

The ranks agree on stopping at points every one of them reaches (`distft.stop`): a step boundary (where they all
save the same step), each evaluation batch, the boundaries of loading and export. A second SIGTERM, or one outside
a run, keeps Ray's default behaviour (exit now).
"""

import logging
import signal
import threading

log = logging.getLogger("distft")

_stop = threading.Event()
_reason: list[str] = []
_training = threading.Event()  # set while a training loop runs in this process
STOP_ACTOR_PREFIX = "distft-stop-"


def request_stop(reason: str) -> None:
    if not _stop.is_set():
        _reason.append(reason)
    _stop.set()


def stop_reason() -> str | None:
    return _reason[0] if _reason else None


def training_started() -> None:
    _stop.clear()
    _reason.clear()
    _training.set()


def training_finished() -> None:
    _training.clear()


def setup_worker_process() -> None:
    """Ray `worker_process_setup_hook`: a SIGTERM during training asks for a checkpoint instead of killing the
    worker. Ray installs its handler after this hook runs, so the hook wraps the function Ray installs it with."""
    try:
        import ray._private.utils as ray_utils

        ray_set_handler = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):  # a Ray without this seam: SIGTERM keeps Ray's behaviour
        return

    def set_handler(ray_handler):
        def on_sigterm(signum, frame):
            if _training.is_set() and not _stop.is_set():
                log.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
                request_stop("SIGTERM received by a worker")
                return
            ray_handler(signum, frame)

        ray_set_handler(on_sigterm)

    ray_utils.set_sigterm_handler = set_handler


class StopFlag:
    """A named Ray actor holding the driver's stop request; rank 0 polls it once per step."""

    def __init__(self):
        self.reason = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self):
        return self.reason


def create_stop_actor(run_name: str):
    """On the driver's node (like Ray Train's controller), so that losing a worker node never loses the flag."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(StopFlag).options(name=STOP_ACTOR_PREFIX + run_name, get_if_exists=True,
                                                     scheduling_strategy=here)
    return actor.remote()


def stop_requests(run_name: str):
    """A callable for every rank: this process's own stop reason (a SIGTERM it received), else the driver's flag,
    else None. A local reason is also written to the flag, so that the other ranks see it at their next check
    (generation, where the ranks do not communicate). Never waits: one request to the flag is always in flight and
    each call only looks whether its answer has arrived."""
    import ray

    try:
        actor = ray.get_actor(STOP_ACTOR_PREFIX + run_name)
    except ValueError:  # run_training called outside `distft.train` (tests, benchmarks)
        return stop_reason
    pending = [actor.get.remote()]
    forwarded = []

    def poll():
        local = stop_reason()
        if local:
            if not forwarded:
                forwarded.append(actor.request.remote(local))
            return local
        ready, _ = ray.wait(pending, timeout=0)
        if not ready:
            return None
        pending[0] = actor.get.remote()
        try:
            return ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a lost flag must never stop training; SIGTERM still works
            log.warning("cannot read the driver's stop flag (%s); going on", type(e).__name__)
            return None

    return poll


_previous_handlers: dict = {}


def install_driver_handler(stop_actor) -> None:
    """First SIGTERM on the driver: ask the workers to checkpoint and stop; a second one exits at once. (SIGINT is
    Ray Train's: Ctrl-C aborts the run without a checkpoint.)"""
    previous = _previous_handlers

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if _stop.is_set():
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
            raise SystemExit(128 + signum)
        request_stop(f"{name} received by the driver")
        print(f"\ndistft: {name}: the workers stop at the next safe point — a step boundary (after saving a "
              f"checkpoint), an evaluation or generation batch, a phase boundary (send {name} again to exit now)\n",
              flush=True)
        stop_actor.request.remote(f"{name} received by the driver")  # no ray.get: we are inside a handler

    for sig in (signal.SIGTERM,):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, on_signal)


def restore_driver_handler() -> None:
    for sig, handler in _previous_handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous_handlers.clear()
    _stop.clear()
    _reason.clear()
