"""What ``experiments.fit`` does when a cluster stops it, and how its checkpoints are written.

SLURM and Kubernetes stop a job with SIGTERM (then SIGKILL after a grace period) and may requeue
it. Lightning's signal connector turns SIGTERM into ``trainer.received_sigterm`` and a
``SIGTERMException`` at the next batch, which on its own ends the process with status 0 and one
log line. :func:`exit_on_sigterm` instead says what is saved and gives the exact command that
resumes it, and exits with status 143 (128 + SIGTERM, what a shell reports for a process the
signal killed), so a job script can tell a cut run from a finished one.

What is saved is ``last.ckpt``, the state after the latest finished epoch: resuming from it
repeats the interrupted epoch from its start and ends exactly where an uninterrupted run ends.
A mid-epoch state could not do that (these data loaders cannot resume mid-epoch; Lightning
itself warns so), which is why :class:`BesideTargetCheckpointIO` does not write the mid-epoch
``hpc_ckpt_N.ckpt`` of Lightning's SLURM auto-requeue (the requeue itself still happens), so
that a requeued job never resumes from one silently either.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from taps_lightning.files.atomic import atomic_write, temporary_name

from taps_lightning.errors import CommandTerminated, OutputError, TapsError

from .runs import find_last_checkpoint

__all__ = ["SIGTERM_EXIT_STATUS", "exit_on_sigterm", "raise_on_sigterm", "resume_command", "resume_target", "evaluation_report", "BesideTargetCheckpointIO",
           "use_beside_target_checkpoint_io"]

#: The exit status of a run stopped by SIGTERM (128 + 15), as a shell shows it for a killed process.
SIGTERM_EXIT_STATUS = 128 + int(signal.SIGTERM)
#: Lightning's SLURM auto-requeue checkpoint (``<default_root_dir>/hpc_ckpt_<n>.ckpt``), saved mid-epoch.
_HPC_CHECKPOINT = re.compile(r"hpc_ckpt_\d+\.ckpt")


def _without_ckpt_path(args: Sequence[str]) -> list[str]:
    """``args`` without ``--ckpt_path X`` / ``--ckpt_path=X``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def resume_command(args: Sequence[str], ckpt_path: str | None) -> str:
    """The shell command that runs fit again with ``args``, resuming from ``ckpt_path`` (none: as given)."""
    argv = [sys.executable, "-m", "experiments.fit", *(args if ckpt_path is None else _without_ckpt_path(args))]
    if ckpt_path is not None:
        argv += ["--ckpt_path", ckpt_path]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}"


def _last_checkpoint_path(trainer) -> Path | None:
    """Where fit's ``last.ckpt`` callback writes (``None`` before the trainer set its folder)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "filename", None) == "last" and getattr(callback, "dirpath", None):
            return Path(callback.dirpath).absolute() / "last.ckpt"
    return None


def _saved_state(path: Path | None) -> dict[str, Any] | None:
    """``epoch`` and ``global_step`` of the checkpoint at ``path``, or ``None`` when there is none."""
    if path is None or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {"epoch": int(checkpoint["epoch"]), "global_step": int(checkpoint["global_step"])}
    except Exception:  # noqa: BLE001 - reported as unreadable below, never raised over the SIGTERM report
        return {"unreadable": True}


def resume_target(cli, last: Path) -> str:
    """What ``--ckpt_path`` resumes ``last`` (this run's ``last.ckpt``): ``last`` where that finds
    it (the TensorBoard logger's run folder, or the ``--checkpoint.dirpath`` given), else its path.
    Every hint a command prints goes through here, so each one works."""
    if cli.config.checkpoint.dirpath and Path(cli.config.checkpoint.dirpath).resolve() == last.parent.resolve():
        return "last"  # --ckpt_path last looks in --checkpoint.dirpath first
    logger_init = getattr(cli, "_logger_init", None)
    if logger_init is not None:
        try:
            newest, _ = find_last_checkpoint(logger_init.save_dir, logger_init.name)
            if newest.resolve() == last.resolve():
                return "last"
        except TapsError:
            pass
    return str(last)


def evaluation_report(cli, args: Sequence[str]) -> str:
    """What was written when SIGTERM stopped ``experiments.evaluate``: nothing (the run folder is
    removed), and the command that evaluates again."""
    argv = [sys.executable, "-m", "experiments.evaluate", *args]
    return (f"TAPS | stopped by SIGTERM while evaluating; exit status {SIGTERM_EXIT_STATUS}. Written: nothing (no "
            f"report; the run folder is removed). Evaluate again with: cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}")


def preemption_report(cli, args: Sequence[str]) -> str:
    """What was saved when SIGTERM stopped ``cli``'s trainer, and the command that continues."""
    trainer = cli.trainer
    stage = getattr(trainer.state.fn, "value", trainer.state.fn)
    last = _last_checkpoint_path(trainer)
    saved = _saved_state(last)
    where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
    lines = [f"TAPS | stopped by SIGTERM during {stage} ({where}); exit status {SIGTERM_EXIT_STATUS}."]
    if stage == "test":
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        config = Path(getattr(trainer.logger, "log_dir", None) or ".") / "config.yaml"  # no collective: rank 0 only
        argv = [sys.executable, "-m", "experiments.evaluate", "--config", str(config), "--ckpt_path", best or str(last)]
        lines.append(f"TAPS | training had finished ({last} and the best checkpoint {best or '-'} are saved); only "
                     f"the test was cut. Test it with: cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}")
        return "\n".join(lines)
    if saved is None:
        lines.append("TAPS | saved: nothing, no epoch had finished. Start again with the same command: "
                     + resume_command(args, None))
        return "\n".join(lines)
    if saved.get("unreadable"):
        lines.append(f"TAPS | {last} cannot be read; resume from a best-*.ckpt beside it with --ckpt_path PATH.")
        return "\n".join(lines)
    redo = trainer.global_step - saved["global_step"]
    lines.append(f"TAPS | saved: {last}, the state at the end of epoch {saved['epoch']} (global step "
                 f"{saved['global_step']}); " + (f"the {redo} optimizer step(s) since are" if redo > 0 else
                                                 "nothing since is") + " repeated on resume, which then ends "
                 "exactly as an uninterrupted run.")
    target = resume_target(cli, last)
    note = "" if target == "last" else " (a new run folder starts from that state)"
    lines.append(f"TAPS | resume{note}: {resume_command(args, target)}")
    return "\n".join(lines)


@contextmanager
def raise_on_sigterm(what: str) -> Iterator[None]:
    """For a command that runs no Lightning Trainer (whose own handler would stop it gracefully):
    SIGTERM raises :class:`~taps_lightning.errors.CommandTerminated` saying ``what`` was and was not
    written, so the command exits 143 with that message instead of dying silently."""
    def handler(signum, frame):
        raise CommandTerminated(f"stopped by SIGTERM; {what}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def exit_on_sigterm(cli, args: Sequence[str] | None, report=preemption_report) -> Iterator[None]:
    """Turn a SIGTERM during a Trainer's run into ``report`` (fit's: :func:`preemption_report`) and
    exit status 143 (Lightning itself ends such a run with status 0)."""
    try:
        yield
    except BaseException as err:
        trainer = getattr(cli, "trainer", None)
        # a worker killed by the same signal may surface as another error first: the flag decides
        if trainer is None or not (isinstance(err, SIGTERMException) or trainer.received_sigterm):
            raise
        if trainer.is_global_zero:
            print(report(cli, sys.argv[1:] if args is None else args), file=sys.stderr, flush=True)
        raise SystemExit(SIGTERM_EXIT_STATUS) from None


class BesideTargetCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, then ``os.replace``: a reader never
    sees half a checkpoint, and a save killed halfway (``kill -9``) leaves its temporary file in
    the checkpoint folder, where the next save of that target removes it, instead of in
    ``$TMPDIR`` (where Lightning's fsspec transaction writes it, and nothing removes it).
    Remote URLs are written by Lightning as before. Lightning's mid-epoch SLURM checkpoint
    (``hpc_ckpt_N.ckpt``) is not written (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        if _HPC_CHECKPOINT.fullmatch(path.name):
            rank_zero_info(f"TAPS | not writing Lightning's mid-epoch SLURM checkpoint {path}: a requeued run resumes "
                           "exactly from last.ckpt (--ckpt_path last)")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a killed earlier save of this file
            if stale.name != temporary_name(path).name:
                stale.unlink(missing_ok=True)
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f), "the checkpoint")
        except OutputError as err:  # e.g. the disk is full: say what is saved and how to go on from it
            kept = (f" The earlier {path.name} is intact: resume from it with --ckpt_path {path}" if path.is_file()
                    else f" No earlier {path.name} exists: nothing of this run can be resumed from here")
            raise OutputError(f"{err}.{kept}") from None


def use_beside_target_checkpoint_io(trainer) -> None:
    """Give ``trainer``'s strategy :class:`BesideTargetCheckpointIO` unless another plugin was chosen."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = BesideTargetCheckpointIO()
