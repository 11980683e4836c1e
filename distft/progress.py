"""Lines that show a long phase is alive (model preparation, evaluation, generation, export): one when it starts,
then at most one every `every` seconds with the count and an estimate of what is left, and one when it ends.
Ray forwards worker output line by line, so these are log lines, not a redrawn bar."""

import logging
import time

log = logging.getLogger("distft.progress")

EVERY_SECONDS = 30.0


class Progress:
    def __init__(self, what: str, total: int | None = None, *, unit: str = "", enabled: bool = True,
                 every: float = EVERY_SECONDS):
        self.what, self.total, self.unit, self.enabled, self.every = what, total, unit, enabled, every
        self.done = 0

    def __enter__(self) -> "Progress":
        self.started = self.last = time.monotonic()
        if self.enabled:
            log.info("%s%s", self.what, f": {self.total} {plural(self.unit, self.total)}".rstrip()
                     if self.total else " ...")
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            elapsed = now - self.started
            if self.total:
                left = elapsed / self.done * (self.total - self.done) if self.done else None
                log.info("%s: %d/%d %s (%d%%), %s%s", self.what, self.done, self.total, self.unit,
                         100 * self.done // self.total, duration(elapsed),
                         f", about {duration(left)} left" if left is not None else "")
            else:
                log.info("%s: %d %s, %s", self.what, self.done, self.unit, duration(elapsed))

    def __exit__(self, kind, value, tb) -> None:
        if self.enabled and kind is None:
            log.info("%s: done in %s", self.what, duration(time.monotonic() - self.started))


def step(what: str, *, enabled: bool = True) -> Progress:
    """One long call with no count (a model read, a state-dict gather): a start line and a done line."""
    return Progress(what, enabled=enabled)


def plural(unit: str, n: int) -> str:
    """"batches" for 1 is "batch"."""
    if n != 1:
        return unit
    return unit[:-2] if unit.endswith("ches") else unit[:-1] if unit.endswith("s") else unit


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
