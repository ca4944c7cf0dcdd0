"""``TapsCLI``: fit's command line (LightningCLI), which evaluate and predict extend.

Every Trainer, model and data argument is a flag (``--trainer.*``, ``--model.*``, ``--data.*``);
the model is built by the composition root, :func:`~taps_lightning.training.compose.create_taps_module`.
Every run claims its own ``<default_root_dir>/logs/<name>/version_N`` folder (runs started at
once never share one) and holds it locked while it lives, so resuming a run that is still
training is refused; output folders are checked for writing before the first step.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from callbacks import (DecathlonScore, LayerSelectionLogger, ResultsReport, TaskExport, TaskParamLogger,
                       TaskSimilarityLogger, lifecycle_callbacks)
from taps_lightning.training.budget import BUDGET_MONITOR
from taps_lightning.errors import CheckpointError, OutputError, SettingsError
from taps_lightning.training.checks import resume_conflicts
from taps_lightning.training.compose import refuse_unused_flags, unread_flag_defaults
from taps_lightning.training.modes import MODES, unused_flags

from .embedded import EMBEDDED_WEIGHTS_SHA256, embedded_weights_path
from .inputs import check_against_data, check_config_order, check_data_flags, check_run_length, task_classes
from .preemption import use_beside_target_checkpoint_io
from .runs import (RUN_VERSION_ENV, RunClaim, first_missing, RunInUseError, RunLock, check_writable, claim_version,
                   find_last_checkpoint, read_checkpoint)

__all__ = ["TapsCLI", "EpochEndCheckpoint", "last_checkpoint", "budget_monitor", "DEFAULT_SAVE_DIR"]

#: Where runs go unless --trainer.logger.init_args.save_dir says otherwise (under --trainer.default_root_dir).
DEFAULT_SAVE_DIR = "logs"


def budget_monitor(budget: float | None, monitor: str) -> tuple[str, str | None]:
    """The checkpoint monitor a run should rank by, and a note when the user's choice may keep a
    best checkpoint over budget: a budget run ranks by ``val/budget_acc`` unless told otherwise; a
    run without a budget cannot (e.g. ``--config`` of a budget run with ``--model.budget null``)."""
    if budget is not None and monitor == "val/acc":
        return BUDGET_MONITOR, None
    if budget is None and monitor == BUDGET_MONITOR:
        return "val/acc", None
    if budget is not None and monitor != BUDGET_MONITOR:
        return monitor, (f"TAPS | --checkpoint.monitor {monitor}: the best checkpoint is not chosen by "
                         f"{BUDGET_MONITOR}, so it may be over --model.budget")
    return monitor, None


class TapsCLI(LightningCLI):
    #: Whether this command writes a run folder (claimed, locked and checked for writing).
    writes_run_folder = True
    #: What this command created and holds locked (``None``: nothing, or not rank zero).
    claim: RunClaim | None = None

    def __init__(self, *args, **kwargs) -> None:
        # TapsModule.configure_optimizers is the optimiser (score group, schedules, phases); LightningCLI's
        # --optimizer/--lr_scheduler would replace or silently miss it, so they are not offered.
        kwargs.setdefault("auto_configure_optimizers", False)
        try:
            super().__init__(*args, **kwargs)
        except BaseException:  # refused while building (settings, data, files): nothing is left behind
            self._end(failed=True)
            raise

    def __enter__(self) -> "TapsCLI":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Release the run folder (the kernel would at process exit; in-process callers need it now),
        and remove what the command claimed if it stopped, however, before it saved a checkpoint."""
        self._end(failed=exc_type is not None)

    def _end(self, failed: bool) -> None:
        if self.claim is not None:
            self.claim.discard() if failed else self.claim.release()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None,
                            help="resume from this checkpoint, or 'last' for the newest last.ckpt of this run name")
        parser.add_argument("--test", type=bool, default=True, help="test the best checkpoint after fitting")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TaskExport, "export")
        parser.add_lightning_class_args(ResultsReport, "report")
        parser.add_lightning_class_args(LayerSelectionLogger, "layer_selection")
        parser.add_lightning_class_args(TaskParamLogger, "param_logger")
        parser.add_lightning_class_args(DecathlonScore, "decathlon_score")
        parser.add_lightning_class_args(TaskSimilarityLogger, "similarity_logger")
        parser.link_arguments("data.num_classes", "model.tasks", compute_fn=task_classes, apply_on="instantiate")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # last.ckpt comes from last_checkpoint(), after every epoch
            "checkpoint.filename": "best-{epoch:02d}",
            "checkpoint.auto_insert_metric_name": False,
            "trainer.max_epochs": 4,
            "trainer.log_every_n_steps": 10,
            "trainer.logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": "taps"},
            },
            "data": {"class_path": "datamodules.EmbeddedDigits"},
            "model.backbone": "mobilenetv2_100",
            "model.weights": "embedded",
            "model.sparsity_warmup_epochs": 1,
        })

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        check_config_order(cfg.get("config"))  # an experiment file needs its benchmark's base.yaml first
        check_data_flags(cfg.data, cfg.model, cfg.trainer)  # sizes, weights, precision, environment: before anything
        check_run_length(cfg.trainer, cfg.model)  # an empty or endless run: refused before a folder is claimed
        if cfg.model.weights == "embedded":
            cfg.model.weights = embedded_weights_path()
            cfg.model.weights_sha256 = EMBEDDED_WEIGHTS_SHA256
        # a budget run's best checkpoint (tested and exported) must meet the budget: ranked by val/budget_acc
        cfg.checkpoint.monitor, note = budget_monitor(cfg.model.budget, cfg.checkpoint.monitor)
        if note:
            print(note, file=sys.stderr)
        mode = MODES.get(cfg.model.mode)
        if mode is not None and getattr(self, "trained", None) is None:  # fit: flags the user changed for nothing
            defaults = self.parser.get_defaults().model
            refuse_unused_flags(mode, cfg.model, defaults)  # a mode that refuses them: before any folder
            for note in unused_flags(mode, cfg.model, defaults):
                warnings.warn(note, UserWarning, stacklevel=2)
        if mode is not None and mode.refuses_unused_flags:  # fit's own defaults differ (sparsity_warmup_epochs)
            for key, value in unread_flag_defaults(mode).items():
                cfg.model[key] = value
        if cfg.trainer.strategy == "ddp" and mode is not None and mode.leaves_parameters_unused:
            # some parameters sit out of the graph in some epochs: DDP must be told to expect that
            cfg.trainer.strategy = "ddp_find_unused_parameters_true"
            print(f"TAPS | mode {cfg.model.mode}: using strategy ddp_find_unused_parameters_true", file=sys.stderr)
        if self.writes_run_folder:
            self.claim = self._prepare_run_folder()

    def _resume_target(self) -> None:
        """``--ckpt_path last`` in a custom ``--checkpoint.dirpath``: that folder's ``last.ckpt``
        (resumed like a path given, into a new log folder)."""
        cfg = self.config
        if cfg.ckpt_path == "last" and cfg.checkpoint.dirpath:
            path = Path(cfg.checkpoint.dirpath) / "last.ckpt"
            if not path.is_file():
                raise CheckpointError(f"--ckpt_path last: no last.ckpt in --checkpoint.dirpath {cfg.checkpoint.dirpath}; "
                                      "train first, or pass the path of a .ckpt")
            cfg.ckpt_path = str(path)

    #: The checkpoint fit resumes from, as read (once) before any folder was claimed.
    resumed_checkpoint: dict | None = None

    def _read_resumed(self, path: str) -> dict:
        self.resumed_checkpoint = read_checkpoint(path)
        return self.resumed_checkpoint

    def _check_resume(self, checkpoint: dict) -> None:
        """The flags that define the checkpoint's weights must be the same: refused before any folder."""
        current = {k: v for k, v in self.config.model.as_dict().items() if k != "tasks"}  # tasks: from the data, later
        problems = resume_conflicts(checkpoint.get("hyper_parameters") or {}, current, str(self.config.ckpt_path))
        if problems:
            raise CheckpointError(f"cannot resume from {self.config.ckpt_path}:\n  - " + "\n  - ".join(problems))

    def _prepare_run_folder(self) -> RunClaim | None:
        """Point the logger at this run's own folder (claimed, or the resumed one), lock it and
        check that every output folder is writable; returns the claim (rank zero only)."""
        cfg = self.config
        self._resume_target()
        resuming = cfg.ckpt_path == "last"
        logger = cfg.trainer.logger
        init = getattr(logger, "init_args", None) if logger not in (None, False, True) else None
        root_dir = cfg.trainer.default_root_dir
        if init is None or not hasattr(init, "save_dir"):
            if resuming:
                raise SettingsError("--ckpt_path last finds a run by its TensorBoard logger folder, but --trainer.logger is off; "
                                    "pass the .ckpt path instead (e.g. --ckpt_path <checkpoint folder>/last.ckpt)")
            if rank_zero_only.rank == 0:
                check_writable(root_dir or os.getcwd(), "--trainer.default_root_dir")
            return None
        if root_dir and str(init.save_dir) == DEFAULT_SAVE_DIR:
            init.save_dir = str(Path(root_dir) / DEFAULT_SAVE_DIR)  # honour Lightning's flag for our default logger
        runs = Path(init.save_dir, init.name or "")
        self._logger_init, self._given_version = init, init.version
        if resuming:
            path, version = find_last_checkpoint(init.save_dir, init.name)
            cfg.ckpt_path = str(path)
            init.version = version  # keep logging into the resumed run's folder
        if cfg.ckpt_path is not None and not resuming:
            # a missing, truncated, code-carrying, diverged or other-settings file: refused before any folder
            self._check_resume(self._read_resumed(cfg.ckpt_path))
        created_from = first_missing(runs)  # logs/<name>/ made for this run: removed with it when refused
        if not resuming and init.version is None:
            if rank_zero_only.rank == 0:
                init.version = claim_version(runs)
                os.environ[RUN_VERSION_ENV] = str(init.version)  # inherited by DDP worker processes
            elif os.environ.get(RUN_VERSION_ENV):
                init.version = int(os.environ[RUN_VERSION_ENV])
        # A new run never overwrites another's config.yaml; a resume keeps the run's config.yaml as it
        # was and records its own settings in config_resume.yaml (also when the resume is refused).
        self.save_config_kwargs["overwrite"] = resuming
        if resuming:
            self.save_config_kwargs["config_filename"] = "config_resume.yaml"
        if rank_zero_only.rank != 0 or init.version is None:
            return None
        run_dir = runs / (init.version if isinstance(init.version, str) else f"version_{init.version}")
        check_writable(run_dir, "the run folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = Path(cfg.checkpoint.dirpath) if cfg.checkpoint.dirpath else run_dir / "checkpoints"
        flag = "--checkpoint.dirpath" if cfg.checkpoint.dirpath else "--trainer.default_root_dir"
        claim = RunClaim(run_dir, new=not resuming, lock=RunLock(run_dir).acquire(),
                         folders=(ckpt_dir,) if cfg.checkpoint.dirpath else (),
                         created_from=created_from.absolute() if created_from else None)
        try:
            if resuming:  # only now: a live run may be writing its last.ckpt
                self._check_resume(self._read_resumed(cfg.ckpt_path))
            check_writable(ckpt_dir, "the checkpoint folder (--checkpoint.dirpath)", flag)
            check_writable(ckpt_dir / "adapters", "the adapter folder", flag)
            if cfg.checkpoint.dirpath:
                self._hold_checkpoint_folder(claim, ckpt_dir)
        except BaseException:
            claim.discard()
            raise
        return claim

    def _hold_checkpoint_folder(self, claim: RunClaim, folder: Path) -> None:
        """A custom ``--checkpoint.dirpath`` is locked like a run folder, and one holding another
        run's checkpoints is refused (a second run would replace its last.ckpt and adapters)."""
        try:
            claim.hold(folder)
        except RunInUseError as err:
            raise RunInUseError(f"--checkpoint.dirpath {folder}: {err}") from None
        resumed_here = self.config.ckpt_path is not None and Path(self.config.ckpt_path).resolve().parent == folder.resolve()
        others = sorted(p.name for p in folder.glob("*.ckpt"))
        if others and not resumed_here:
            raise OutputError(f"--checkpoint.dirpath {folder} already holds another run's checkpoints ({', '.join(others[:3])}"
                              f"): this run would replace them. Choose an empty folder, or resume that run with "
                              f"--ckpt_path {folder / 'last.ckpt'}")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_against_data(self)  # task names the adapter files can carry; class names as trained

    def recalibrate_batches(self) -> int | None:
        """Norm re-estimation's batches per task (``None``: the module's ``--model.recalibrate_batches``)."""
        return None

    def after_instantiate_classes(self) -> None:
        trainer = getattr(self, "trainer", None)  # experiments.predict builds none
        best = trainer.checkpoint_callback if trainer is not None else None
        if best is not None:
            trainer.callbacks.append(last_checkpoint(best.dirpath))
        if trainer is not None:
            # enforcement, re-estimation, flips, resume guard: before every other callback, in this order
            trainer.callbacks[:0] = lifecycle_callbacks(self.recalibrate_batches())
            use_beside_target_checkpoint_io(trainer)  # temporary files beside the checkpoint, not in $TMPDIR
        # normalise inputs as the backbone's weights expect (timm pretrained_cfg: 0.5/0.5 for the
        # authors' ViT, ImageNet's for the CNNs); Decathlon keeps its per-task statistics
        if hasattr(self.datamodule, "set_normalization"):
            self.datamodule.set_normalization(*self.model.input_mean_std)
        # The logger now has its folder; config.yaml keeps the version the user gave (usually none),
        # so that `--config <run>/config.yaml` starts a new run instead of reusing this folder.
        if getattr(self, "_logger_init", None) is not None:
            self._logger_init.version = self._given_version


class EpochEndCheckpoint(ModelCheckpoint):
    """``last.ckpt``, written at every epoch's end and only there: a run stopped inside an epoch
    (``--trainer.max_time``, ``max_steps``, an early stop, SIGTERM) keeps the previous epoch's,
    and a resume repeats the cut epoch from its start, ending exactly as an uninterrupted run.
    Lightning would otherwise save the cut state as if the epoch had finished, and the resume
    would skip the rest of it silently (these data loaders cannot resume mid-epoch)."""

    def __init__(self, dirpath: str | None) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        #: Whether the run stopped inside an epoch (and that state was not saved).
        self.cut_short = False

    @staticmethod
    def epoch_finished(trainer) -> bool:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or progress.current.completed >= trainer.num_training_batches

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.epoch_finished(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        else:
            self.cut_short = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.epoch_finished(trainer):  # not a mid-epoch validation (--trainer.val_check_interval < 1)
            super().on_validation_end(trainer, pl_module)


def last_checkpoint(dirpath: str | None) -> EpochEndCheckpoint:
    """``last.ckpt`` after every epoch, what ``--ckpt_path last`` resumes from. Lightning 2.6
    writes a monitored ``ModelCheckpoint``'s ``save_last`` file only when a new best is saved, so
    a resume from it would silently go back to the best epoch and lose the epochs after it."""
    return EpochEndCheckpoint(dirpath)
