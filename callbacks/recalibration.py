"""``NormRecalibration``: each task's BatchNorm statistics re-estimated for the weights evaluated."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from taps_lightning.errors import TapsError
from taps_lightning.training.lightning_module import TapsModule
from taps_lightning.training.recalibrate import recalibrate_norms

__all__ = ["NormRecalibration"]


class NormRecalibration(L.Callback):
    """Before every validation (not the sanity check) and every test, re-estimate each task's own
    BatchNorm statistics for the current weights on ``batches`` batches of its training images
    (the DataModule's ``norm_dataloader``: evaluation transform, the same images every time,
    sharded over DDP ranks and averaged, so every rank ends with the same statistics).

    Checkpoints and exports therefore hold statistics of their own weights. The training
    trajectory is untouched: no gradient, and neither the training loader nor the global RNG is
    used. A no-op when already done for these weights, with 0 batches, without a DataModule that
    has a ``norm_dataloader``, or for tasks without BatchNorm of their own.

    Args:
        batches: batches per task; ``None``: the module's ``--model.recalibrate_batches``.
    """

    def __init__(self, batches: int | None = None) -> None:
        self.batches = batches
        #: ``{task: images}`` the statistics of the evaluated weights were re-estimated on (empty: not re-estimated)
        self.images: dict[str, int] = {}
        self._fresh = False  # statistics re-estimated for the weights as they are now

    @staticmethod
    def of(trainer: L.Trainer) -> "NormRecalibration | None":
        """The trainer's ``NormRecalibration``, if it has one."""
        return next((c for c in trainer.callbacks if isinstance(c, NormRecalibration)), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._fresh = False  # the weights moved: re-estimated before the next evaluation

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._fresh = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        if not trainer.sanity_checking:
            self.recalibrate(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        self.recalibrate(trainer, pl_module)

    def recalibrate(self, trainer: L.Trainer, pl_module: TapsModule) -> dict[str, int]:
        """Re-estimate now (unless done for these weights); returns ``{task: images}``."""
        if self._fresh:
            return self.images
        batches = self.batches if self.batches is not None else pl_module.evaluation_settings.recalibrate_batches
        datamodule = trainer.datamodule
        if not batches or datamodule is None or not hasattr(datamodule, "norm_dataloader"):
            self.images = {}  # the statistics are the ones stored with the weights
            return self.images
        images = {}
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        with torch.random.fork_rng(devices=[]), trainer.precision_plugin.forward_context():
            for task in pl_module.eval_tasks():
                if not pl_module.model.task_batchnorms(task):
                    continue
                try:
                    loader = datamodule.norm_dataloader(task, batches, trainer.global_rank, trainer.world_size)
                except (OSError, ValueError) as err:  # e.g. evaluating on data without its training split
                    raise TapsError(f"{err}\n(re-estimating {task}'s BatchNorm statistics needs its training images; "
                                    "to keep the statistics stored with the weights instead, pass "
                                    "--model.recalibrate_batches 0, or --recalibrate_batches 0 to evaluate)") from err
                inputs = (b[0].to(pl_module.device, non_blocking=True) for b in loader if b is not None)
                images[task] = recalibrate_norms(pl_module.model, task, inputs, reduce)
        self.images, self._fresh = images, True
        return images
