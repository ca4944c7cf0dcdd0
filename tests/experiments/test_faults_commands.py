"""The commands' error boundary and their claims (#31 §1-§4): a user error is one plain message and
exit status 2, a refusal leaves nothing behind, every hint printed works, a stop inside an epoch
resumes that epoch from its start, and a signal is never a success."""
import math
import re
from pathlib import Path

import pytest
import torch

from experiments import evaluate, predict
from experiments.fit import main as fit_main
from taps_lightning.errors import (EXIT_DIVERGED, EXIT_USER_ERROR, CheckpointError, SettingsError, TapsError,
                                   run_command)

TINY = ["--model.backbone", "test_resnet", "--model.weights", "null", "--data.tasks", "[mnist]",
        "--data.max_train_per_task", "16", "--data.batch_size", "8", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_home):
    """One finished tiny run: its folder and last.ckpt."""
    import os

    folder = tmp_path_factory.mktemp("trained")
    old, os.environ["TAPS_DATA_HOME"] = os.environ.get("TAPS_DATA_HOME"), str(data_home)
    try:
        fit_main(TINY + ["--trainer.default_root_dir", str(folder)])
    finally:
        os.environ.pop("TAPS_DATA_HOME") if old is None else os.environ.__setitem__("TAPS_DATA_HOME", old)
    run = folder / "logs" / "taps" / "version_0"
    return run, run / "checkpoints" / "last.ckpt"


def _refused(capsys, main, args) -> str:
    """Run ``main(args)`` through the boundary; it must exit 2 with a plain message, which is returned."""
    with pytest.raises(SystemExit) as info:
        run_command(main, args)
    err = capsys.readouterr().err
    assert info.value.code == EXIT_USER_ERROR and "Traceback" not in err, err[-2000:]
    return err


def _edited(checkpoint: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    path = tmp_path / "edited.ckpt"
    torch.save(state, path)
    return path


# -- the boundary ---------------------------------------------------------------------------------
def test_the_boundary_gives_each_kind_of_stop_its_documented_status(capsys, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def raising(err):
        def main():
            raise err
        return main

    cases = [(SettingsError("--x must be 1"), EXIT_USER_ERROR, "--x must be 1"),
             (FloatingPointError("non-finite loss at epoch 0"), EXIT_DIVERGED, "non-finite loss at epoch 0"),
             (KeyboardInterrupt(), 130, "interrupted"), (SIGTERMException(), 143, "SIGTERM"),
             (FileNotFoundError(2, "No such file or directory", "/nope/x.png"), EXIT_USER_ERROR, "/nope/x.png"),
             (ValueError("wrapped by a library"), EXIT_USER_ERROR, "the cause")]
    cases[-1][0].__cause__ = TapsError("the cause")  # e.g. jsonargparse's link wraps the error of its compute_fn
    for err, status, text in cases:
        with pytest.raises(SystemExit) as info:
            run_command(raising(err))
        out = capsys.readouterr().err
        assert info.value.code == status and text in out and "Traceback" not in out, (err, out)
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_command(raising(RuntimeError("a bug")))
    monkeypatch.setenv("TAPS_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_command(raising(SettingsError("--x must be 1")))
    assert "Traceback" in capsys.readouterr().err  # on request


# -- refusals leave nothing behind ------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--trainer.max_epochs", "0"], r"--trainer.max_epochs must be >= 1.*got 0, which trains nothing"),
    (["--trainer.max_epochs", "-1"], r"--trainer.max_epochs -1 with no --trainer.max_steps or --trainer.max_time never ends"),
    (["--trainer.max_steps", "0"], r"--trainer.max_steps must be >= 1"),
])
def test_a_run_of_no_step_or_no_end_is_refused_before_a_folder(flags, message, in_tmp, capsys):
    err = _refused(capsys, fit_main, TINY + flags)
    assert re.search(message, err)
    assert not (in_tmp / "logs").exists()


def test_a_refusal_after_the_folder_was_claimed_removes_it(in_tmp, capsys, monkeypatch):
    """Refused while the model is built (the run folder, its lock and config exist by then)."""
    err = _refused(capsys, fit_main, TINY + ["--model.lr", "-1"])
    assert "--model.lr must be a finite number > 0" in err
    assert not (in_tmp / "logs").exists()  # version_0, and the logs/taps/ made for it


def test_a_crash_before_the_first_checkpoint_removes_the_run_folder(in_tmp, monkeypatch):
    from taps_lightning.training.lightning_module import TapsModule

    def boom(self, batch, batch_idx):
        raise FloatingPointError("non-finite loss at epoch 0")

    monkeypatch.setattr(TapsModule, "training_step", boom)
    with pytest.raises(FloatingPointError):
        fit_main(TINY)
    assert not (in_tmp / "logs").exists()  # no version_0: nothing to resume from


def test_a_resume_that_fails_keeps_the_run_as_it_was(trained, tmp_path, capsys, monkeypatch):
    run, last = trained
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".running"}
    root = run.parents[2]
    for flags, message in [(["--model.threshold", "0.12"], "threshold=0.1, but this run has threshold=0.12"),
                           (["--model.budget", "0.5"], "budget=None, but this run has budget=0.5")]:
        err = _refused(capsys, fit_main, TINY + ["--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                                                 "--trainer.max_epochs", "2", *flags])
        assert message in err and "cannot resume from" in err
    # refused later, once the resumed run's folder is claimed (the model is built): its files all stay
    err = _refused(capsys, fit_main, TINY + ["--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                                             "--trainer.max_epochs", "2", "--model.lr", "-1"])
    assert "--model.lr must be a finite number > 0" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".running"} == before


# -- checkpoints given to evaluate and predict --------------------------------------------------------
def test_a_checkpoint_with_a_diverged_head_is_refused_by_name(trained, in_tmp, capsys):
    _, last = trained

    def nan_head(state):
        key = next(k for k in state["state_dict"] if ".heads." in k and k.endswith("weight"))
        state["state_dict"][key][0, 0] = math.nan

    bad = _edited(last, in_tmp, nan_head)
    image = in_tmp / "x.png"
    from PIL import Image

    Image.new("RGB", (28, 28)).save(image)
    for main, extra in [(evaluate.main, []), (predict.main, ["--images", str(image), "--output", str(in_tmp / "p.csv")])]:
        err = _refused(capsys, main, TINY + ["--ckpt_path", str(bad), *extra])
        assert f"{bad}: holds non-finite weights (model.heads.mnist.weight)" in err and "Lower --model.lr" not in err
    assert not (in_tmp / "logs").exists() and not (in_tmp / "p.csv").exists()


def test_edited_hyper_parameters_are_blamed_on_the_checkpoint_not_on_flags(trained, in_tmp, capsys):
    _, last = trained
    wrong_type = _edited(last, in_tmp, lambda s: s["hyper_parameters"].update(threshold="abc"))
    err = _refused(capsys, evaluate.main, TINY + ["--ckpt_path", str(wrong_type)])
    assert f"{wrong_type}: hyper-parameters that this version cannot use" in err and "threshold: 'abc' is not a float" in err
    above_start = _edited(last, in_tmp, lambda s: s["hyper_parameters"].update(threshold=0.2))
    err = _refused(capsys, evaluate.main, TINY + ["--ckpt_path", str(above_start)])
    assert f"--ckpt_path: {above_start}: the settings recorded in it are refused" in err
    assert not (in_tmp / "logs").exists()  # evaluate's run folder is gone too


def test_evaluating_a_checkpoint_warns_of_no_resume(trained, in_tmp, recwarn):
    _, last = trained
    evaluate.main(TINY + ["--ckpt_path", str(last)])
    assert not [w for w in recwarn if "resuming with changed --model settings" in str(w.message)]


def test_evaluate_refusing_the_data_leaves_no_run_folder(trained, in_tmp, capsys):
    _, last = trained
    err = _refused(capsys, evaluate.main, TINY + ["--ckpt_path", str(last), "--data.tasks", "[sketch]"])
    assert "lacks ['mnist']" in err
    assert not (in_tmp / "logs").exists()


@pytest.mark.parametrize("kind", ["checkpoint", "task file"])
def test_weights_that_are_a_checkpoint_or_a_task_file_point_to_the_right_flag(kind, trained, in_tmp, capsys):
    run, last = trained
    weights = last if kind == "checkpoint" else run / "checkpoints" / "adapters" / "mnist.safetensors"
    err = _refused(capsys, fit_main, TINY + ["--model.weights", str(weights)])
    assert (f"--ckpt_path {weights}" if kind == "checkpoint" else f"--tasks_from {weights}") in err


# -- outputs never replaced, hints that work -----------------------------------------------------------
def test_a_checkpoint_folder_is_held_by_its_run_and_last_finds_it(in_tmp, capsys, caplog):
    shared = in_tmp / "shared"
    fit_main(TINY + ["--checkpoint.dirpath", str(shared)])
    assert "resume with --ckpt_path last)" in caplog.text
    kept = (shared / "last.ckpt").read_bytes()
    err = _refused(capsys, fit_main, TINY + ["--checkpoint.dirpath", str(shared)])
    assert f"--checkpoint.dirpath {shared} already holds another run's checkpoints" in err
    assert (shared / "last.ckpt").read_bytes() == kept
    fit_main(TINY + ["--checkpoint.dirpath", str(shared), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert torch.load(shared / "last.ckpt", weights_only=True)["epoch"] == 1  # resumed from that folder


def test_without_a_logger_the_closing_lines_advise_what_works(in_tmp, caplog):
    fit_main(TINY + ["--trainer.logger", "false"])
    text = caplog.text
    assert "resume with --ckpt_path last)" not in text and "TensorBoard:" not in text
    assert re.search(r"resume with --ckpt_path \S+/last.ckpt\)", text)


# -- stops inside an epoch, signals ----------------------------------------------------------------
def test_a_stop_inside_an_epoch_keeps_the_last_epoch_boundary_and_resumes_it(in_tmp, caplog):
    flags = TINY + ["--data.max_train_per_task", "48", "--trainer.max_epochs", "2", "--test", "false"]
    fit_main(flags + ["--trainer.max_steps", "8"])  # 6 steps an epoch: stops 2 steps into epoch 1
    text = caplog.text
    last = in_tmp / "logs" / "taps" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 6)  # the end of epoch 0, not step 8
    assert "the run stopped inside an epoch" in text
    fit_main(flags + ["--ckpt_path", "last"])
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 12)  # epoch 1 trained whole


def test_a_sigterm_while_evaluating_is_not_a_success(trained, in_tmp, monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from taps_lightning.training.lightning_module import TapsModule

    _, last = trained

    def terminated(self, *args, **kwargs):
        self.trainer._signal_connector.received_sigterm = True
        raise SIGTERMException()  # what Lightning raises in its evaluation loop after SIGTERM

    monkeypatch.setattr(TapsModule, "test_step", terminated)
    with pytest.raises(SystemExit) as info:
        run_command(evaluate.main, TINY + ["--ckpt_path", str(last)])
    err = capsys.readouterr().err
    assert info.value.code == 143 and "stopped by SIGTERM while evaluating" in err and "Written: nothing" in err
    assert not (in_tmp / "logs").exists()


# -- numbers messages print ------------------------------------------------------------------------
def test_the_budget_warning_prints_the_true_excess():
    from taps_lightning.training.budget import BudgetPolicy

    policy = BudgetPolicy(["a", "b"], budget=0.2)
    before = policy.rank_score(torch.tensor(0.9), {"a": 0.7012, "b": 0.3}, penalised=False)
    assert "50.12 points over, from before the sparsity penalty started" in policy.missed_message(float(before))
    after = policy.rank_score(torch.tensor(0.9), {"a": 0.25, "b": 0.2}, penalised=True)
    assert "(5.00 points over)" in policy.missed_message(float(after))


def test_a_library_error_is_typed(tmp_path):
    """The commands' helpers raise typed errors (the boundary turns them into messages), never SystemExit."""
    from experiments.run.runs import read_checkpoint

    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_a_full_disk_during_a_checkpoint_save_says_what_is_kept_and_how_to_resume(tmp_path, monkeypatch):
    import errno

    from experiments.run.preemption import BesideTargetCheckpointIO
    from taps_lightning.errors import OutputError
    from taps_lightning.files import atomic

    path = tmp_path / "last.ckpt"
    io = BesideTargetCheckpointIO()
    io.save_checkpoint({"epoch": 0}, path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OutputError, match=rf"No space left.*The earlier last.ckpt is intact: resume from it with "
                                          rf"--ckpt_path {path}"):
        io.save_checkpoint({"epoch": 1}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_resume_refused_after_its_claim_keeps_a_relative_run_folder_whole(in_tmp, capsys):
    """The run folder as most users have it, relative to the working directory (logs/taps/version_0)."""
    fit_main(TINY)
    run = Path("logs/taps/version_0")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".running"}
    assert any(p.suffix == ".ckpt" for p in before)
    err = _refused(capsys, fit_main, TINY + ["--ckpt_path", "last", "--trainer.max_epochs", "2", "--model.lr", "-1"])
    assert "--model.lr must be a finite number > 0" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".running"} == before
