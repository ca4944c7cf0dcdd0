"""The package's typed errors: one base class for every error a user can fix.

A :class:`TapsError` is raised for what a user gave (a flag, a data folder, an image, a task file,
a checkpoint, an output folder, an environment variable); its message names that and the fix.
Every command goes through :func:`run_command`, which prints such an error's message alone,
without a traceback, and exits with :attr:`TapsError.exit_code`; any other exception is a bug
and keeps its traceback.
Library code raises them too, so a user's own loop can catch ``TapsError`` the same way.
"""
from __future__ import annotations

__all__ = ["TapsError", "SettingsError", "TaskFileError", "CheckpointError", "OutputError", "CommandTerminated",
           "run_command", "plain_message", "EXIT_USER_ERROR", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "DEBUG_ENV"]

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


class CommandTerminated(TapsError):
    """The command was stopped by a signal (SIGTERM: a cluster's preemption, ``kill``)."""

    exit_code = 128 + 15  # what a shell reports for a process SIGTERM killed


#: Exit status of a command whose run diverged (a non-finite loss or non-finite logits).
EXIT_DIVERGED = 3
#: Exit status of a command interrupted with Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 128 + 2
#: Set to 1 to see the traceback behind a refusal (``TAPS_DEBUG=1 python -m experiments.fit ...``).
DEBUG_ENV = "TAPS_DEBUG"


def plain_message(err: BaseException) -> str:
    """The error's own message (an error re-raised from a DataLoader worker carries the worker's
    traceback as text; its last line is the message)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text or type(err).__name__


def _outcome(err: BaseException) -> tuple[int, str] | None:
    """``(exit status, message)`` for an error a user can act on; ``None`` for a bug."""
    if isinstance(err, SystemExit):  # argparse's own exit, a status a command chose, or a legacy message
        if isinstance(err.code, str):
            return EXIT_USER_ERROR, err.code
        if type(err).__name__ == "SIGTERMException":  # Lightning's: a SystemExit with no status (0!)
            return CommandTerminated.exit_code, "stopped by SIGTERM"
        return (0 if err.code is None else int(err.code)), ""
    if isinstance(err, TapsError):
        return err.exit_code, plain_message(err)
    if isinstance(err, FloatingPointError):  # the run diverged: the message says where and what to do
        return EXIT_DIVERGED, plain_message(err)
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(err, MemoryError):
        return EXIT_USER_ERROR, ("out of memory" + (f" ({err})" if str(err) else "") + ": lower "
                                 "--data.init_args.batch_size, --data.init_args.image_size or --data.init_args.num_workers")
    if isinstance(err, OSError) and err.filename is not None:  # a file or folder the user named or the disk
        return EXIT_USER_ERROR, f"{err.filename}: {err.strerror or err}"
    cause = err.__cause__ or err.__context__  # a user error a library wrapped (jsonargparse's links, a worker)
    while cause is not None:
        if isinstance(cause, TapsError):
            return cause.exit_code, plain_message(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def run_command(main, *args, **kwargs):
    """The error boundary of every command (``fit``, ``evaluate``, ``predict``, ``datamodules.check``,
    ``reproduce``): ``main(*args, **kwargs)``, and for an error a user can act on, its message alone
    on stderr and a documented exit status instead of a traceback:

    ====  ==========================================================================
    0     done
    1     a bug: Python's traceback (please report it)
    2     refused: a flag, data, file, checkpoint, output or environment to fix (the message says which)
    3     the run diverged (non-finite loss or logits; the message says where)
    130   interrupted (Ctrl-C)
    143   stopped by SIGTERM (what was saved and how to resume is printed before)
    ====  ==========================================================================

    ``TAPS_DEBUG=1`` prints the traceback behind a refusal too. What a command claimed (a run
    folder, its lock) is released by the command itself before the error reaches here."""
    import os
    import sys
    import traceback

    try:
        return main(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - sorted into user errors and bugs below
        outcome = _outcome(err)
        if outcome is None:
            raise
        status, message = outcome
        if os.environ.get(DEBUG_ENV) and status != 0:
            traceback.print_exception(err)
        if message:
            print(message if status != CommandTerminated.exit_code else f"TAPS | {message}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
