"""Stop requests (SIGTERM, a preemption notice) inside a run, in every phase.

The ranks must agree to stop at a point every one of them reaches — a step boundary, an evaluation batch, a phase
boundary — because a rank that leaves alone leaves the others waiting in a collective. Before the first step there
is nothing to save; after the last step its checkpoint exists; so a stop while loading, evaluating or exporting
loses nothing that rerunning the same command does not redo. During training the loop saves the step it stops at.
"""

from collections.abc import Callable

import torch

from distft import dist


class StopRequested(Exception):
    """Raised at an agreed stop point outside the training steps; the recipe turns it into a `stopped` result."""

    def __init__(self, reason: str, phase: str):
        super().__init__(f"{reason} (during {phase})")
        self.reason, self.phase = reason, phase


class StopCheck:
    """This rank's view of a stop request and the agreed decision. A reason, once seen, stays: the driver's flag is
    polled asynchronously and may read as unset on the next call."""

    def __init__(self, should_stop: Callable[[], str | None] | None, device: torch.device):
        self._ask, self.device = should_stop, device
        self.reason: str | None = None
        self.steps_done = 0  # what the run has behind it (and checkpointed) if it stops now

    def local(self) -> str | None:
        """Without communicating: for loops whose length differs between ranks (generation)."""
        if self.reason is None and self._ask is not None:
            self.reason = self._ask()
        return self.reason

    def agree(self) -> str | None:
        """Collective (when a stop can be asked at all): the reason if any rank was told to stop, else None."""
        if self._ask is None:
            return None
        mine = self.local()
        return self.agreed(dist.all_reduce(float(mine is not None), self.device, op="max") > 0)

    def agreed(self, any_rank: bool) -> str | None:
        """The reason, once the ranks have reduced their `local()` flags themselves (the training loop sends them
        with its loss): collective only when some rank was told to stop."""
        if not any_rank:
            return None
        return next((r for r in dist.all_gather_objects(self.reason) if r), "stop requested")

    def check(self, phase: str) -> None:
        """An agreed stop point: raises StopRequested if any rank was told to stop."""
        reason = self.agree()
        if reason:
            raise StopRequested(reason, phase)


NO_STOP = StopCheck(None, torch.device("cpu"))  # one process without a launcher: never asked to stop
