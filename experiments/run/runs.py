"""Run folders that concurrent runs never share, and a lock that keeps a live run's folder its own.

``logs/<name>/version_N`` is claimed with ``os.mkdir`` (atomic: of several runs started at
once, each gets its own ``N``), and the run holds an exclusive ``fcntl.flock`` on
``version_N/.running`` for as long as it lives. The kernel drops that lock when the process
ends, however it ends (``kill -9`` included), so ``--ckpt_path last`` can tell a run that is
still training (refused) from one that died (resumed) without heartbeats or stale-lock rules.
"""
from __future__ import annotations

import fcntl
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from taps_lightning.errors import CheckpointError, OutputError, TapsError

def first_missing(folder: str | os.PathLike) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet (``None``: it exists)."""
    folder, missing = Path(folder).absolute(), None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


__all__ = ["first_missing", "RunLock", "RunInUseError", "claim_version", "check_writable", "read_checkpoint", "find_last_checkpoint", "RunClaim",
           "RUN_VERSION_ENV"]

#: Set by rank 0 for the DDP worker processes Lightning starts, so they log to the same folder.
RUN_VERSION_ENV = "TAPS_RUN_VERSION"
LOCK_NAME = ".running"


class RunInUseError(TapsError, RuntimeError):
    """The run folder is held by a live process."""


def _version_of(path: Path) -> int | None:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else None


def claim_version(root: str | os.PathLike) -> int:
    """Create ``root/version_N`` for the smallest free ``N`` above every existing one and return ``N``."""
    root = Path(root)
    check_writable(root, "the log folder (--trainer.default_root_dir or --trainer.logger.init_args.save_dir)")
    root.mkdir(parents=True, exist_ok=True)
    existing = [v for v in (_version_of(p) for p in root.iterdir()) if v is not None]
    version = max(existing, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:  # another run took it a moment ago: take the next one
            version += 1


def check_writable(folder: str | os.PathLike, what: str, flag: str = "--trainer.default_root_dir") -> Path:
    """Prove that ``folder`` can be written (or created) before any training, leaving nothing
    behind: a file is written and removed in ``folder`` or in its nearest existing ancestor."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_test_"):
            pass
    except OSError as err:
        raise OutputError(
            f"{what}: cannot write to {folder} ({type(err).__name__}: {err.strerror or err}"
            f"{f' at {existing}' if existing != folder else ''}). "
            f"Choose a writable folder (e.g. {flag} /scratch/$USER); nothing has run yet."
        ) from None
    return folder


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the process's end."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunInUseError` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(
                f"{self.path.parent} is in use by a run that is still going ({self.holder()}). Resuming it now "
                "would overwrite its last.ckpt and adapters: wait for it to finish, or start a new run "
                "(drop --ckpt_path). The lock is released automatically when that process ends."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file itself stays (harmless, reused)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` (whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says),
    with errors that name ``--ckpt_path`` and the file instead of a traceback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path: {path}: " + ("is a folder; give a .ckpt file in it (e.g. last.ckpt)"
                                                     if path.is_dir() else "no such file"))
    try:
        # mmap: checking a file (or reading its hyper-parameters) does not read every tensor into memory
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"--ckpt_path: {path}: not a readable checkpoint (not a torch file, or one holding Python "
                         "objects besides tensors and plain values, which is never unpickled: it could run code); "
                         "use a checkpoint written by experiments.fit") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"--ckpt_path: {path}: not a readable checkpoint ({reason}); it may be truncated "
                         "(an interrupted save): use another, e.g. best-*.ckpt") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"--ckpt_path: {path}: not a Lightning checkpoint (no state_dict); "
                         "give a .ckpt written by experiments.fit")
    bad = [k for k, v in checkpoint["state_dict"].items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged state: resuming, evaluating or predicting from it gives nothing but NaN
        raise CheckpointError(f"--ckpt_path: {path}: holds non-finite weights ({', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run had diverged when it "
                              "was saved; use an earlier checkpoint (e.g. best-*.ckpt beside it)")
    return checkpoint


class RunClaim:
    """What a command created for its run (a new run folder, or files in a resumed one; a custom
    checkpoint folder), held locked, and removed again when the command stops before it saved
    a checkpoint: a refusal or an early crash leaves nothing behind. Rank zero only."""

    def __init__(self, run_dir: Path, new: bool, lock: "RunLock", folders: tuple[Path, ...] = (),
                 created_from: Path | None = None) -> None:
        self.run_dir, self.new, self.lock = Path(run_dir).absolute(), new, lock
        #: The outermost folder above ``run_dir`` this command created (e.g. ``logs/``), removed too when empty.
        self.created_from = created_from
        self.started = time.time()
        self.before = self._files(self.run_dir)
        self.created = [f for f in folders if not f.exists()]  # e.g. a --checkpoint.dirpath that does not exist yet
        self.locks: list[RunLock] = []

    @staticmethod
    def _files(folder: Path) -> set[Path]:
        return set(folder.rglob("*")) if folder.is_dir() else set()

    def hold(self, folder: Path) -> None:
        """Lock another folder this run writes (a custom checkpoint folder) as its run folder is locked."""
        folder.mkdir(parents=True, exist_ok=True)
        self.locks.append(RunLock(folder).acquire())

    def checkpointed(self) -> bool:
        """Whether the run saved a checkpoint since it started (then everything it wrote stays)."""
        folders = [self.run_dir, *self.created, *(lock.path.parent for lock in self.locks)]
        return any(p.stat().st_mtime >= self.started for f in folders if f.is_dir() for p in f.rglob("*.ckpt"))

    def release(self) -> None:
        for lock in [self.lock, *self.locks]:
            lock.release()

    def discard(self) -> None:
        """Release the locks and, unless a checkpoint was saved, remove what this command created."""
        self.release()
        if self.checkpointed():
            return
        if self.new:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            folder = self.run_dir.parent
            while self.created_from is not None and folder.is_relative_to(self.created_from):
                try:
                    folder.rmdir()  # only when empty: another run's folder beside it stays
                except OSError:
                    break
                folder = folder.parent
        else:  # a resumed run keeps what it had: only what this attempt added goes (never a weights file)
            added = [p for p in self._files(self.run_dir) - self.before if p.suffix not in (".ckpt", ".safetensors")]
            for path in sorted(added, key=lambda p: len(p.parts), reverse=True):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for folder in self.created:
            shutil.rmtree(folder, ignore_errors=True)
        for lock in self.locks:  # an existing checkpoint folder keeps nothing of this run
            if lock.path.parent not in self.created:
                lock.path.unlink(missing_ok=True)


def find_last_checkpoint(save_dir: str, name: str) -> tuple[Path, int]:
    """Newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` and its version number."""
    candidates = sorted(Path(save_dir, name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no last.ckpt under {Path(save_dir, name)}/version_*/checkpoints/. "
            "Train first, pass the path of a .ckpt, or use the same --trainer.logger.init_args.name as the run to resume."
        )
    path = candidates[-1]
    version = int(re.sub(r"\D", "", path.parent.parent.name) or 0)
    return path, version
