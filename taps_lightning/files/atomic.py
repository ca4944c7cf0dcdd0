"""The one way this project replaces a file: whole or not at all.

:func:`atomic_write` writes to a temporary file beside the target (same folder, so same file
system), flushes and fsyncs it, then ``os.replace``-s it onto the target: a reader sees the old
file or the new one, never half of one, and a write killed halfway leaves the old file as it was.

What a plain ``open(path, "w")`` would do is kept where it matters:

* the new file's permissions are ``0o666 & ~umask`` (as ``open``/``torch.save`` give), or those
  of the file it replaces; ``tempfile.mkstemp`` would give 0600;
* a symlink is written through (its target is replaced, the link stays).

and what ``os.replace`` alone would do wrong is refused, before anything is written, with an
:class:`~taps_lightning.errors.OutputError` naming the path and the fix: a target that is a
folder, a device, a FIFO or a socket (``os.replace`` would silently swap a CSV in for
``/dev/...``), a read-only file (``open`` would refuse it), a parent that is not a folder.
A write that fails (disk full, quota, an error in the writer) removes its temporary file and
says what was not written and that the earlier file is intact.
"""
from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import IO, Callable

from ..errors import OutputError

__all__ = ["atomic_write", "temporary_name", "check_replaceable", "folder_problem"]


def temporary_name(path: Path) -> Path:
    """The temporary file a write of ``path`` goes through: ``.<name>.<pid>.tmp`` beside it (a killed
    write's leftover is recognisable, and removable by the next write of the same target)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _target(path: Path) -> Path:
    """``path`` with symlinks resolved (a link is written through, as ``open`` does)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_replaceable(path: str | os.PathLike, what: str = "the file", flag: str | None = None) -> Path:
    """The path :func:`atomic_write` would write for ``path`` (symlinks resolved), or an
    :class:`OutputError` if it must not or cannot be replaced by a regular file. Nothing is written;
    callers use it to refuse a bad output before any work."""
    given = Path(path)
    target = _target(given)
    named = f"{flag} {given}" if flag else str(given)
    fix = f"give another path{f' with {flag}' if flag else ''}"
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except OSError as err:
        raise OutputError(f"{named}: cannot write {what} there ({err.strerror or err}); {fix}") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{named}: is a folder, not {what}; {fix} (a file name inside it, e.g. "
                              f"{given / 'out'}...)")
        if not stat.S_ISREG(info.st_mode):
            kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                    "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
                    "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
            raise OutputError(f"{named}: is {kind}, not a regular file; {what} is only written to a regular file, "
                              f"which would replace it: {fix}")
        if not os.access(target, os.W_OK):
            raise OutputError(f"{named}: is read-only; {what} would replace it. Make it writable "
                              f"(chmod u+w {given}) or {fix}")
    parent = target.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{named}: {existing} is not a folder, so {what} cannot be written below it; {fix}")
    return target


def folder_problem(folder: str | os.PathLike, writable: bool = True) -> str | None:
    """Why ``folder`` cannot be used as a folder (to read from, and when ``writable`` to create files in),
    or ``None``: it, or its nearest existing ancestor when it does not exist yet, must be a folder (and
    writable). Callers add what named it (a flag, an environment variable) and the fix."""
    folder = Path(folder).absolute()
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = "a file" if existing.is_file() else "not a folder"
        return f"{existing} is {kind}" if existing == folder else f"{existing} (above it) is {kind}"
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _describe(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{err.strerror or 'no space left on device'}: free space there"
    return f"{type(err).__name__}: {err.strerror or err}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], what: str = "the file",
                 flag: str | None = None, text: bool = False) -> Path:
    """Replace ``path`` by what ``write(f)`` writes to ``f`` (binary, or text with ``newline=""`` when
    ``text``), whole or not at all; returns the path written (symlinks resolved).

    Refuses a target that is not a regular file or cannot be written (see the module docstring) before
    ``write`` runs. On failure the temporary file is removed and the earlier file, if any, is intact;
    an ``OSError`` (disk full, ...) becomes an :class:`OutputError` saying so, any other error
    (a bug, a refusal of the writer's own) propagates unchanged.
    """
    target = check_replaceable(path, what, flag)
    named = f"{flag} {path}" if flag else str(path)
    try:
        previous = os.stat(target)
    except FileNotFoundError:
        previous = None
    tmp = temporary_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:  # left by a killed process that had this pid: not ours to keep
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as raw:
            if text:
                wrapper = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                try:
                    write(wrapper)
                finally:
                    wrapper.detach()  # flushes; the raw file stays ours to fsync and close
            else:
                write(raw)
            raw.flush()
            if previous is not None:  # as open() would: the replaced file keeps its permissions
                os.chmod(raw.fileno(), stat.S_IMODE(previous.st_mode))
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            kept = f"the previous {target.name} is intact" if previous is not None else "no file was written"
            raise OutputError(f"{named}: {what} was not written ({_describe(err)}); {kept}. "
                              f"Fix that{f' or choose another path with {flag}' if flag else ''} "
                              "and run again") from err
        raise
    _sync_folder(target.parent)
    return target


def _sync_folder(folder: Path) -> None:
    """fsync the folder, so the rename itself survives a power cut (best effort: not every OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
