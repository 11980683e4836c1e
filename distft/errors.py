"""Errors a user can fix. Entry points print these as one clear message, not a stack trace."""


class UserError(Exception):
    """A problem in the user's input (config, data, environment) with a message that says how to fix it."""


class ConfigError(UserError):
    """The composed config is inconsistent. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class DataError(UserError):
    """The dataset is missing, malformed or empty. Messages name the file and line."""


class WorkerUserError(UserError):
    """A UserError raised on a Ray worker, as it crosses to the driver: its message, the rank and the log file that
    holds the full traceback. The driver prints the message alone (exit code 2); Ray's own logging of it is
    filtered (`distft.console`)."""

    def __init__(self, message: str, rank: int | None = None, log: str | None = None):
        super().__init__(message)
        self.rank, self.log = rank, log

    def __reduce__(self):  # keep rank and log across pickling (Exception pickles only `args`)
        return type(self), (str(self), self.rank, self.log)
