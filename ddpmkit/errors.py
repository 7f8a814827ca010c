"""Errors that a user can act on.

Every :class:`DdpmkitError` carries a one-line message saying what was wrong and
what would be right. The CLI prints it and exits with code 2 (bad input); the
library raises it.
"""


class DdpmkitError(Exception):
    """Bad input: unknown name, invalid value, unreadable checkpoint, ..."""


class PluginError(DdpmkitError):
    """A plugin is broken: duplicate names, unknown hooks."""


class Interrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a training-state checkpoint.

    ``signum`` is the signal; ``exit_code`` what a command exits with (128 + signal: 143, 130);
    the message says where the checkpoint is and how to resume.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum
