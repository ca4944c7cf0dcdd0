"""The one atomic-write helper and every place that writes through it (#31 §A): permissions follow
the umask, a non-regular target is refused and kept, a failed write keeps the earlier file."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

import pytest
import torch

import taps_lightning as tl
from helpers import tiny_resnet
from taps_lightning.errors import OutputError
from taps_lightning.files import atomic
from taps_lightning.files.atomic import atomic_write


def _save_task(path: Path) -> None:
    tl.save_task(tiny_resnet({"a": 3}), "a", path)


def _write_csv(path: Path) -> None:
    from experiments.predict import write_csv

    write_csv(path, ["path", "task"], [["x.png", "a"]])


def _save_checkpoint(path: Path) -> None:
    from experiments.run.preemption import BesideTargetCheckpointIO

    BesideTargetCheckpointIO().save_checkpoint({"epoch": 1}, path)


def _submission(path: Path) -> None:
    from datamodules import write_submission

    write_submission({"dtd": [(1, 0)]}, {"dtd": [7]}, path)


def _helper(path: Path) -> None:
    atomic_write(path, lambda f: f.write(b"new"))


#: Every writer that must go through atomic_write (embedded data and reproduce's record are built by
#: the same call; they need a dataset build or a training run to reach it).
WRITERS: dict[str, Callable[[Path], None]] = {"helper": _helper, "save_task": _save_task, "predict_csv": _write_csv,
                                              "checkpoint_io": _save_checkpoint, "decathlon_submission": _submission}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("writer", WRITERS)
def test_new_file_mode_follows_umask(writer, tmp_path, umask_022):
    """Under umask 022 a new file is 0644, as open()/torch.save make it (mkstemp gives 0600)."""
    path = tmp_path / "out.bin"
    WRITERS[writer](path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_replaced_file_keeps_its_permissions(tmp_path, umask_022):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    _helper(path)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("writer", WRITERS)
def test_fifo_target_is_refused_and_kept(writer, tmp_path):
    """A FIFO (stand-in for a device) at the target is refused by name, not replaced by a file."""
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="FIFO") as err:
        WRITERS[writer](fifo)
    assert str(fifo) in str(err.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


@pytest.mark.parametrize("writer", WRITERS)
def test_folder_target_is_refused(writer, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        WRITERS[writer](folder)
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("writer", WRITERS)
def test_disk_full_keeps_earlier_file_and_no_temporary(writer, tmp_path, monkeypatch):
    """A write failing with ENOSPC: the earlier file intact, no temporary file, an OutputError saying so."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"earlier")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OutputError) as err:
        WRITERS[writer](path)
    message = str(err.value)
    assert str(path) in message and "not written" in message and "intact" in message
    assert path.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_failing_writer_leaves_nothing(tmp_path):
    path = tmp_path / "new.bin"

    def write(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no file was written"):
        atomic_write(path, write, "the thing")
    assert not any(tmp_path.iterdir())


def test_symlink_is_written_through(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    _helper(link)
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_read_only_target_is_refused(tmp_path, monkeypatch):
    """open() would refuse a read-only file; os.replace would silently replace it."""
    path = tmp_path / "ro.bin"
    path.write_bytes(b"old")
    path.chmod(0o444)
    if os.geteuid() == 0:  # root may write anything: let access() answer as for a user
        real = os.access
        monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == path else real(p, mode))
    with pytest.raises(OutputError, match="read-only"):
        _helper(path)
    assert path.read_bytes() == b"old"


def test_task_file_roundtrip_through_helper(tmp_path):
    model = tiny_resnet({"a": 3})
    path = tl.save_task(model, "a", tmp_path / "a.safetensors")
    other = tiny_resnet({"b": 2})
    assert tl.load_task(other, path) == "a"
    torch.testing.assert_close(other.heads["a"].weight, model.heads["a"].weight)
