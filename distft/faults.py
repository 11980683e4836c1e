"""Fault injection for the failure tests: `DISTFT_FAULT_AT_STEP="STEP:RANK[:MODE]"` makes that rank fail once when
it reaches optimizer step STEP, after its backward passes and before the step's collectives and update.

MODE: kill (default: the process exits), sigterm (the process sends itself SIGTERM, as a preemption would), nan
(that step's loss is NaN, on every attempt), sleep (a 60 s pause, so that a test can take a node away mid-run),
user_error (a DataError, as a worker that finds a problem in the user's input raises it).
A marker file in the run directory makes kill/sigterm/sleep happen once, so a restarted attempt passes the step.
"""

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("distft")

FAULT_ENV = "DISTFT_FAULT_AT_STEP"


class Faults:
    """This rank's injected fault, if the environment asks for one. `at_step` is the one call per step."""

    def __init__(self, rank: int, run_dir: Path, spec: str | None = None):
        spec = os.environ.get(FAULT_ENV) if spec is None else spec
        self.rank, self.run_dir = rank, run_dir
        self.step, self.mode = None, None
        if spec:
            parts = spec.split(":")
            fault_rank = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            if fault_rank == rank:
                self.step, self.mode = int(parts[0]), parts[2] if len(parts) > 2 and parts[2] else "kill"

    def at_step(self, step: int, loss_sum: float) -> float:
        """Called with the step being taken and this rank's loss sum; returns the loss sum to use."""
        if step != self.step:
            return loss_sum
        if self.mode == "nan":
            return float("nan")
        if self.mode == "user_error":
            from distft.errors import DataError

            raise DataError(f"{FAULT_ENV}: an injected problem in the data at step {step} (unset {FAULT_ENV})")
        marker = self.run_dir / f".fault_injected_step{step}_rank{self.rank}"
        if marker.exists():  # only once, so the restarted attempt can pass this step
            return loss_sum
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        if self.mode == "sleep":  # holds the run at this step so a test can take a node away
            log.warning("%s: rank %d pauses at step %d", FAULT_ENV, self.rank, step)
            time.sleep(60)
        elif self.mode == "sigterm":
            log.warning("%s: rank %d sends itself SIGTERM at step %d", FAULT_ENV, self.rank, step)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # let the main thread run the handler before the step boundary is checked
        else:
            log.error("%s: killing rank %d at step %d", FAULT_ENV, self.rank, step)
            os._exit(1)
        return loss_sum
