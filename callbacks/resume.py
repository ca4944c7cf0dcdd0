"""``ResumeGuard``: a resumed run continues the checkpoint's run, or is refused saying why."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from taps_lightning.errors import CheckpointError
from taps_lightning.training.checks import class_name_changes, data_class_names, resume_changes
from taps_lightning.training.lightning_module import TapsModule

__all__ = ["ResumeGuard"]


class ResumeGuard(L.Callback):
    """Records the data's class names in every checkpoint (``taps_class_names``) and, whenever a
    checkpoint is loaded (a resume, or ``validate``/``test`` with ``ckpt_path``):

    - refuses data whose class names changed (a renamed class folder shifts every label after
      it). Other values of the flags that define the checkpoint's weights
      (:data:`~taps_lightning.training.checks.RESUME_FIXED_FLAGS`) are refused by the module
      itself, in the one hook Lightning calls before it loads the weights;
    - when fit resumes, warns, naming each, of the other flags that changed (they apply from here on),
      and gives the optimizer this run's flags again: restoring a checkpoint replaces the
      optimizer's param groups whole (rates, momentum, weight decay), so a resume with another
      ``--model.lr`` would otherwise train on with the checkpoint's. The schedule keeps its
      position and takes the new base rates; with the same flags nothing changes, bit for bit.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: TapsModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["taps_class_names"] = data_class_names(trainer.datamodule, pl_module.tasks)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: TapsModule, checkpoint: dict[str, Any]) -> None:
        origin = str(trainer.ckpt_path or "the checkpoint")
        names = class_name_changes(checkpoint.get("taps_class_names") or {},
                                   data_class_names(trainer.datamodule, pl_module.tasks), origin)
        if names:
            raise CheckpointError(names)
        saved, current = checkpoint.get("hyper_parameters") or {}, dict(pl_module.hparams)
        changed = resume_changes(saved, current) if trainer.state.fn == TrainerFn.FITTING else {}
        if changed:  # evaluating a checkpoint resumes nothing: no warning
            rank_zero_warn("resuming with changed --model settings, which apply from here on: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))

    def on_train_start(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        if trainer.ckpt_path is None:  # resumed: Lightning has just restored the optimizer's state
            return
        optimizer, settings = trainer.optimizers[0], pl_module.param_group_settings()
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)
        if trainer.lr_scheduler_configs:  # the rates at the schedule's position, from the new base rates
            trainer.lr_scheduler_configs[0].scheduler.rebase([s["lr"] for s in settings][:len(optimizer.param_groups)])
