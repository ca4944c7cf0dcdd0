"""The package's typed errors: one base class for every error a user can fix.

A :class:`TapsError` is raised for what a user gave (a flag, a data folder, an image, a task file,
a checkpoint, an output folder, an environment variable); its message names that and the fix.
The commands in ``experiments`` print such an error's message alone, without a traceback, and
exit with :attr:`TapsError.exit_code`; any other exception is a bug and keeps its traceback.
Library code raises them too, so a user's own loop can catch ``TapsError`` the same way.
"""
from __future__ import annotations

__all__ = ["TapsError", "SettingsError", "TaskFileError", "CheckpointError", "OutputError", "EXIT_USER_ERROR"]

#: Exit status of a command refused for a user error (argparse's own status for a bad flag).
EXIT_USER_ERROR = 2


class TapsError(Exception):
    """An error in what the user gave; the message names it and the fix."""

    exit_code = EXIT_USER_ERROR


class SettingsError(TapsError, ValueError):
    """A setting (flag, config value, constructor argument) out of range or in conflict with another."""


class TaskFileError(TapsError, ValueError):
    """A task file that cannot be used: unreadable, of another model or base, or inconsistent."""


class CheckpointError(TapsError, ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or of other settings or data."""


class OutputError(TapsError, OSError):
    """An output (run folder, checkpoint folder, report, CSV) that cannot or must not be written."""
