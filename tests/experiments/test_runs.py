"""Run folders: never shared by concurrent runs, never resumed while live, where the user says, and
writable before training starts; checkpoints never execute code."""
import os
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest
import yaml

from experiments.run.runs import RunInUseError, RunLock, claim_version
from taps_lightning.errors import TapsError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.backbone", "test_resnet", "--model.weights", "null", "--data.tasks", "[mnist]",
        "--data.max_train_per_task", "16", "--data.batch_size", "8", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--test", "false"]


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """A separate process that takes the run lock and sleeps, as a live training run would."""
    code = ("import sys, time; from experiments.run.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_live_holder_and_frees_when_it_is_killed(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunInUseError, match=rf"{tmp_path} is in use by a run that is still going \(pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # as kill -9 on a crashed job
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead process's lock
        pass


def _claim(args):
    root, start = args
    while time.time() < start:
        pass
    return claim_version(root)


def test_concurrent_claims_get_distinct_folders(tmp_path):
    (tmp_path / "version_0").mkdir()
    start = time.time() + 1.0
    with get_context("spawn").Pool(6) as pool:
        versions = pool.map(_claim, [(tmp_path, start)] * 6)
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


def _cli(args):
    from datamodules import MultiTaskDataModule
    from experiments.run.cli import TapsCLI
    from taps_lightning.training.compose import create_taps_module

    return TapsCLI(create_taps_module, MultiTaskDataModule, subclass_mode_data=True, run=False, args=args,
                   seed_everything_default=0, save_config_kwargs={"overwrite": False})


def test_default_root_dir_is_honoured_and_save_dir_still_works(in_tmp):
    with _cli(TINY + ["--trainer.default_root_dir", str(in_tmp / "scratch")]) as cli:
        assert Path(cli.trainer.logger.log_dir) == in_tmp / "scratch" / "logs" / "taps" / "version_0"
        assert (in_tmp / "scratch" / "logs" / "taps" / "version_0").is_dir()
        assert not (in_tmp / "logs").exists()
        # what config.yaml will say: no version, so `--config <run>/config.yaml` starts a new run
        assert cli.trainer.logger.version == 0 and cli.config.trainer.logger.init_args.version is None
    with _cli(TINY + ["--trainer.default_root_dir", str(in_tmp / "scratch"),
                      "--trainer.logger.init_args.save_dir", str(in_tmp / "elsewhere")]) as cli:
        assert Path(cli.trainer.logger.log_dir) == in_tmp / "elsewhere" / "taps" / "version_0"


def test_unwritable_checkpoint_folder_is_refused_before_training(in_tmp):
    blocker = in_tmp / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TapsError, match=rf"checkpoint folder \(--checkpoint.dirpath\): cannot write to {blocker}/ckpt .*--checkpoint.dirpath /scratch"):
        _cli(TINY + ["--checkpoint.dirpath", str(blocker / "ckpt")])
    with pytest.raises(TapsError, match="log folder.*cannot write to"):
        _cli(TINY + ["--trainer.default_root_dir", str(blocker)])


def test_resuming_a_live_run_is_refused(in_tmp):
    run = in_tmp / "logs" / "taps" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"being written by the live run")
    holder = _hold_lock(run)
    try:
        with pytest.raises(TapsError, match=r"version_0 is in use by a run that is still going.*wait for it to finish"):
            _cli(TINY + ["--ckpt_path", "last"])
    finally:
        holder.kill()
        holder.wait()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"being written by the live run"


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_never_executes_code_whatever_the_environment(in_tmp, monkeypatch):
    import torch

    from experiments.fit import main

    marker = in_tmp / "executed"
    crafted = in_tmp / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(str(marker))}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # as on clusters that load old checkpoints
    with pytest.raises(TapsError, match="--ckpt_path: .*crafted.ckpt: not a readable checkpoint .*never unpickled"):
        main(TINY + ["--ckpt_path", str(crafted)])
    assert not marker.exists()


@pytest.mark.slow
def test_three_runs_started_at_once_keep_their_own_folders(in_tmp, data_home):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TAPS_DATA_HOME": str(data_home), "OMP_NUM_THREADS": "1"}
    env.pop("TAPS_RUN_VERSION", None)
    lams = ["0.25", "0.5", "0.75"]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.fit", *TINY, "--model.lam", lam], cwd=in_tmp,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for lam in lams]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    runs = sorted((in_tmp / "logs" / "taps").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    seen = []
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        hparams = yaml.safe_load((run / "hparams.yaml").read_text())
        assert config["model"]["lam"] == hparams["lam"]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        seen.append(str(hparams["lam"]))
    assert sorted(seen) == lams


def test_refused_resume_keeps_the_runs_config_and_bad_checkpoints_are_named(in_tmp):
    from experiments.fit import main

    main(TINY)
    run = in_tmp / "logs" / "taps" / "version_0"
    config = (run / "config.yaml").read_text()
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".running"}  # the lock: re-taken
    for flag in (["--model.threshold", "0.12"], ["--model.budget", "0.5"]):  # refused before anything is written
        with pytest.raises(TapsError, match=r"cannot resume from .*last.ckpt:\n  - --model.(threshold|budget): the "
                                            r"checkpoint was trained with (threshold=0.1|budget=None), but this run has"):
            main(TINY + ["--ckpt_path", "last", *flag])
    assert (run / "config.yaml").read_text() == config  # the run's own record is untouched
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".running"} == files  # nothing added or changed
    truncated = in_tmp / "truncated.ckpt"
    truncated.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(TapsError, match=rf"--ckpt_path: {truncated}: not a readable checkpoint"):
        main(TINY + ["--ckpt_path", str(truncated)])
    with pytest.raises(TapsError, match=r"--ckpt_path: .*missing.ckpt: no such file"):
        main(TINY + ["--ckpt_path", str(in_tmp / "missing.ckpt")])
    assert sorted(p.name for p in (in_tmp / "logs" / "taps").iterdir()) == ["version_0"]  # no folder for them
    with pytest.raises(SystemExit):  # LightningCLI's own optimiser flags would bypass TapsModule's
        main(TINY + ["--optimizer", "Adam"])


def test_last_checkpoint_is_the_last_epoch_even_when_the_best_is_earlier(in_tmp):
    """Lightning 2.6 writes a monitored ModelCheckpoint's last.ckpt only with a new best; fit's own
    last.ckpt must still be the final epoch, or ``--ckpt_path last`` would go back in time."""
    import torch

    from experiments.fit import main

    main(TINY + ["--trainer.max_epochs", "3", "--checkpoint.monitor", "epoch", "--checkpoint.mode", "min"])
    folder = in_tmp / "logs" / "taps" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["best-00.ckpt", "last.ckpt"]
    assert torch.load(folder / "best-00.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


def test_a_run_refused_while_building_leaves_no_folder(in_tmp):
    from experiments.fit import main

    with pytest.raises(ValueError, match="--model.budget"):
        main(TINY + ["--model.budget", "0.0001"])  # below what the norms and head take
    assert not list((in_tmp / "logs" / "taps").glob("version_*"))
    main(TINY)  # the next run still gets version_0
    assert [p.name for p in (in_tmp / "logs" / "taps").iterdir()] == ["version_0"]


def test_budget_run_ranks_checkpoints_by_budget_and_reports_it(in_tmp):
    from experiments.fit import main

    cli = main(TINY + ["--model.budget", "0.5", "--model.sparsity_warmup_epochs", "0", "--trainer.max_epochs", "2",
                       "--test", "true"])
    assert cli.trainer.checkpoint_callback.monitor == "val/budget_acc"
    run = in_tmp / "logs" / "taps" / "version_0"
    report = (run / "report.md").read_text()
    assert "budget=0.5, penalty=params" in report and "| lambda |" in report
    assert "Budget 50 % of the backbone per task: every task is within it" in report
    assert float(cli.trainer.checkpoint_callback.best_model_score) >= 0  # an epoch within budget was kept
    # the run's config names val/budget_acc; reused without a budget it falls back to val/acc
    again = main(["--config", str(run / "config.yaml"), "--model.budget", "null", "--trainer.max_epochs", "1"])
    assert again.trainer.checkpoint_callback.monitor == "val/acc"
