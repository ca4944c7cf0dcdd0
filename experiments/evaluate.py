"""``python -m experiments.evaluate``: validate or test trained tasks without training.

The tasks come from a checkpoint of ``experiments.fit`` (``--ckpt_path``; the model is rebuilt
from its hyper-parameters and loaded with ``weights_only=True``) or from task files loaded
onto the base that ``--model.backbone/--model.weights`` build (``--tasks_from``; files from
different runs mix, as long as they were trained on that base). The data is ``--data.*`` as in
fit, restricted to those tasks. It prints fit's results table, writes ``report.md``/``report.csv``
and the layer-selection heatmap to its own run folder (``logs/evaluate/version_N``) and runs
under DDP like fit (``--trainer.devices N --trainer.strategy ddp``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from callbacks import LayerSelectionLogger, TaskExport, TaskParamLogger, TaskSimilarityLogger
from callbacks.selection import log_images, save_images, selection_images
from datamodules import MultiTaskDataModule
from taps_lightning.training.compose import create_taps_module
from taps_lightning.errors import SettingsError, run_command

from .run.preemption import evaluation_report, exit_on_sigterm
from .run.trained import TrainedCLI

#: fit's callbacks that act on training (checkpoints, exports, per-epoch logs): left out here.
FIT_ONLY_CALLBACKS = (ModelCheckpoint, TaskExport, LayerSelectionLogger, TaskParamLogger, TaskSimilarityLogger)


class EvaluateCLI(TrainedCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--split", type=Literal["val", "test"], default="test", help="the split to evaluate on")
        parser.add_argument("--recalibrate_batches", type=Optional[int], default=None,
                            help="re-estimate each task's BatchNorm statistics on this many batches of the data's "
                                 "training images before evaluating (0: use the stored statistics; default: the "
                                 "model's --model.recalibrate_batches, as in fit)")
        parser.set_defaults({"trainer.logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": "evaluate"},
        }})

    def before_instantiate_classes(self) -> None:
        if (self.config.recalibrate_batches or 0) < 0:
            raise SettingsError(f"--recalibrate_batches must be >= 0, got {self.config.recalibrate_batches}")
        super().before_instantiate_classes()
        # the data's tasks are the trained ones (in --data.tasks' order when it lists them, e.g. a run's config)
        data_args, tasks = self.config.data.init_args, list(self.trained.num_classes)
        if data_args.tasks is None:
            data_args.tasks = tasks
        elif missing := [t for t in tasks if t not in data_args.tasks]:
            raise SettingsError(f"--data.tasks {list(data_args.tasks)} lacks {missing} of {self.trained.origin()}; "
                             "drop --data.tasks or add them (to evaluate some tasks, pass only their files to --tasks_from)")
        else:
            data_args.tasks = [t for t in data_args.tasks if t in tasks]

    def recalibrate_batches(self) -> int | None:
        return self.config.recalibrate_batches  # None: the model's --model.recalibrate_batches, as in fit

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self.trained.check_data(self.datamodule.num_classes)
        self.trained.load_into(self.model)
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, FIT_ONLY_CALLBACKS)]
        # Lightning asks for the checkpoint's ModelCheckpoint to restore its state: irrelevant without training
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")


def main(args: list[str] | None = None) -> EvaluateCLI:
    with EvaluateCLI(create_taps_module, MultiTaskDataModule, subclass_mode_data=True, run=False, args=args,
                     seed_everything_default=0) as cli:
        with exit_on_sigterm(cli, args, report=evaluation_report):  # status 143 and what was written, not 0
            _evaluate(cli)
    return cli


def _evaluate(cli: EvaluateCLI) -> None:
    trainer, model, data, split = cli.trainer, cli.model, cli.datamodule, cli.config.split
    run = trainer.validate if split == "val" else trainer.test
    run(model, data, ckpt_path=cli.config.ckpt_path, weights_only=True, verbose=False)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
    if trainer.is_global_zero and model.model.learns_gates:
        images = selection_images(model.model, f" ({split} set, evaluated)")
        log_images(trainer, images, step=0)
        save_images(images, log_dir)
        rank_zero_info(f"TAPS | layer selection: {log_dir / 'layer_selection.png'} (TensorBoard: taps/layer_selection)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # as in fit: gloo threads alive at exit can abort the run


if __name__ == "__main__":
    run_command(main)  # the error boundary: a user error is its message and exit status 2, no traceback
