"""Errors that a user can act on.

Every :class:`DdpmkitError` carries a one-line message saying what was wrong and
what would be right. The CLI prints it and exits with code 2 (bad input); the
library raises it.
"""


class DdpmkitError(Exception):
    """Bad input: unknown name, invalid value, unreadable checkpoint, ..."""


class PluginError(DdpmkitError):
    """A plugin is broken: duplicate names, unknown hooks."""
