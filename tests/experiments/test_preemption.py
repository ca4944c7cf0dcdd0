"""A run stopped by SIGTERM (SLURM, Kubernetes): exit status 143, a report of what is saved with the
exact resume command, and that command ends exactly where an uninterrupted run ends; Lightning's SLURM
auto-requeue on its signal, without a mid-epoch checkpoint; checkpoints written beside their target."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.backbone", "test_resnet", "--model.weights", "null", "--data.tasks", "[mnist]",
        "--data.max_train_per_task", "16", "--data.batch_size", "8", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--test", "false"]


def _env(data_home, **extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "TAPS_DATA_HOME": str(data_home), "OMP_NUM_THREADS": "1", **extra}
    env.pop("TAPS_RUN_VERSION", None)
    return env


def _pause(marker: Path, epoch: int = 1) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "helpers.PauseForSignal",
                                                "init_args": {"marker": str(marker), "epoch": epoch}})


def _start(args, cwd, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.fit", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail("the run ended before it paused:\n" + proc.stdout.read()[-3000:])
        assert time.time() < deadline, "the run never reached the pause"
        time.sleep(0.1)


def _state(ckpt: Path) -> dict:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {"epoch": c["epoch"], "global_step": c["global_step"], "state_dict": c["state_dict"],
            "optimizer": c["optimizer_states"], "schedulers": c["lr_schedulers"]}


def _assert_same(a, b, where="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigterm_exits_143_says_how_to_resume_and_the_resume_equals_an_uninterrupted_run(tmp_path, data_home):
    env = _env(data_home)
    straight = _start(TINY + ["--trainer.max_epochs", "3", "--trainer.logger.init_args.name", "straight"], tmp_path, env)
    marker = tmp_path / "paused"
    cut = _start(TINY + ["--trainer.max_epochs", "3", "--trainer.logger.init_args.name", "cut", _pause(marker)],
                 tmp_path, env)
    _wait_for(marker, cut)
    cut.send_signal(signal.SIGTERM)  # as SLURM or Kubernetes stop a job: mid-epoch 1
    out = cut.communicate(timeout=600)[0]
    assert cut.returncode == 143, out[-3000:]
    last = tmp_path / "logs" / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    assert "TAPS | stopped by SIGTERM during fit (epoch 1, global step 3); exit status 143" in out
    assert f"TAPS | saved: {last}, the state at the end of epoch 0 (global step 2)" in out
    command = re.search(r"^TAPS \| resume: (.*)$", out, re.M).group(1)
    assert command.startswith(f"cd {tmp_path} && {sys.executable} -m experiments.fit ") and command.endswith(
        " --ckpt_path last")
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]

    resumed = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "logs" / "cut" / "version_1").exists()  # continued in its own folder
    _assert_same(_state(tmp_path / "logs" / "straight" / "version_0" / "checkpoints" / "last.ckpt"), _state(last))


@pytest.mark.slow
def test_slurm_requeue_signal_requeues_without_a_mid_epoch_checkpoint(tmp_path, data_home):
    """Lightning's SLURMEnvironment (detected from the job's variables, auto-requeue on SIGUSR1) runs
    ``scontrol requeue <job id>`` (a stand-in records it); no hpc_ckpt_N.ckpt is written, so a requeued
    job cannot resume from a mid-epoch state; the SIGTERM that follows ends the run with 143."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    env = _env(data_home, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="taps", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_NODELIST="localhost")
    marker = tmp_path / "paused"
    run = _start(TINY + ["--trainer.max_epochs", "2", _pause(marker)], tmp_path, env)
    _wait_for(marker, run)
    run.send_signal(signal.SIGUSR1)  # `#SBATCH --signal=USR1@90`: the time limit is near
    deadline = time.time() + 120
    while not (tmp_path / "scontrol.log").exists():
        assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)  # what `scontrol requeue` does to the running job
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 143, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not list(tmp_path.rglob("hpc_ckpt_*")), "a mid-epoch checkpoint was written"
    assert "TAPS | resume: " in out and out.rstrip().endswith("--ckpt_path last")


_KILLED_WHILE_SAVING = """
import os, shutil, signal, sys
real_replace, real_move = os.replace, shutil.move

def kill_at_ckpt(real):
    def rename(src, dst, *args, **kwargs):  # the checkpoint is written, not yet in place: kill -9 now
        if str(dst).endswith(".ckpt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    return rename

os.replace, shutil.move = kill_at_ckpt(real_replace), kill_at_ckpt(real_move)
from experiments.fit import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_checkpoint_save_killed_halfway_leaves_its_temporary_file_beside_the_target(tmp_path, data_home):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    run = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, *TINY, "--trainer.max_epochs", "1"], cwd=tmp_path,
                         env=_env(data_home, TMPDIR=str(tmpdir)), capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert not list(tmpdir.iterdir()), "a temporary checkpoint was left in $TMPDIR"
    folder = tmp_path / "logs" / "taps" / "version_0" / "checkpoints"
    left = list(folder.iterdir())
    assert len(left) == 1 and re.fullmatch(r"\.best-00\.ckpt\.\d+\.tmp", left[0].name), left
    assert left[0].stat().st_size > 10_000  # the whole checkpoint, in the folder the user looks at


def test_the_next_save_of_a_target_removes_a_killed_saves_temporary_file(tmp_path):
    from experiments.run.preemption import BesideTargetCheckpointIO

    stale = tmp_path / ".last.ckpt.99999999.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".best-00.ckpt.99999999.tmp"  # another target's: left for its own next save
    other.write_bytes(b"x")
    BesideTargetCheckpointIO().save_checkpoint({"epoch": 3}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best-00.ckpt.99999999.tmp", "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"epoch": 3}


@pytest.mark.parametrize("given", [["--ckpt_path", "old/last.ckpt"], ["--ckpt_path=old/last.ckpt"]],
                         ids=["separate", "equals"])
def test_the_printed_resume_command_replaces_a_ckpt_path_the_user_gave(given, monkeypatch, tmp_path):
    """The SIGTERM report's command: the user's flags in their order, any ``--ckpt_path`` they gave
    (either form) dropped, then ``--ckpt_path <target>``; run from the current folder."""
    import shlex

    from experiments.run.preemption import resume_command

    monkeypatch.chdir(tmp_path)
    args = ["--data.tasks", "[mnist]", *given, "--trainer.max_epochs", "3"]
    command = resume_command(args, "last")
    cd, _, rest = command.partition(" && ")
    assert cd == f"cd {shlex.quote(str(tmp_path))}"
    assert shlex.split(rest) == [sys.executable, "-m", "experiments.fit", "--data.tasks", "[mnist]",
                                 "--trainer.max_epochs", "3", "--ckpt_path", "last"]
    assert "old/last.ckpt" not in command
    # no target (nothing saved yet): the command exactly as given, its --ckpt_path included
    assert shlex.split(resume_command(args, None).partition(" && ")[2]) == [sys.executable, "-m", "experiments.fit",
                                                                              *args]
