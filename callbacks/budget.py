"""``BudgetEnforcement``: every state a budget run validates, checkpoints or exports meets its budget."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from taps_lightning.training.budget import BUDGET_MONITOR
from taps_lightning.training.lightning_module import TapsModule

__all__ = ["BudgetEnforcement"]


class BudgetEnforcement(L.Callback):
    """The storage budget's lifecycle around training (a no-op without ``--model.budget``):

    - after an epoch's last training batch, and before any validation during fit (also a
      mid-epoch one, ``--trainer.val_check_interval``), each over-budget task's lowest-score
      layers are switched off (:meth:`~taps_lightning.training.budget.LambdaPolicy.enforce`),
      so that validation, checkpoints and exports only ever see weights within the budget;
    - at each validation's (and test's) end, ``<stage>/budget_acc``, what the best checkpoint
      is ranked by: the mean accuracy when every task is within budget, below every such epoch
      otherwise (:meth:`~taps_lightning.training.budget.LambdaPolicy.rank_score`);
    - at fit's end, a warning when even the best checkpoint misses the budget.

    It must come before :class:`NormRecalibration` (the statistics are re-estimated for the gates
    that are validated); :func:`callbacks.lifecycle_callbacks` gives both in that order.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TapsModule, outputs, batch, batch_idx: int) -> None:
        # the epoch's last batch: before validation and ModelCheckpoint see the weights
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self.enforce(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.enforce(pl_module)

    @staticmethod
    def enforce(pl_module: TapsModule) -> None:
        """Switch off what is over budget once the penalty applies. The scores are the same on
        every rank, so every rank switches off the same layers."""
        for message in pl_module.lam_policy.enforce(pl_module.model, pl_module.tasks, pl_module.penalty_active()):
            rank_zero_info(message)

    def _log_rank_score(self, pl_module: TapsModule, stage: str) -> None:
        if not pl_module.mode.learns_gates:
            return
        metrics = [m for m in pl_module.eval_metrics(stage).values() if m.update_called]
        if not metrics:
            return
        mean_acc = torch.stack([m.compute() for m in metrics]).mean()  # as the module logs <stage>/acc
        score = pl_module.lam_policy.rank_score(mean_acc, pl_module.task_fractions(), pl_module.penalty_active())
        if score is not None:
            pl_module.log(f"{stage}/budget_acc", score, sync_dist=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        self._log_rank_score(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        self._log_rank_score(pl_module, "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        ckpt = trainer.checkpoint_callback  # a budget run whose best checkpoint is still over budget
        if ckpt is not None and ckpt.monitor == BUDGET_MONITOR:
            message = pl_module.lam_policy.missed_message(ckpt.best_model_score)
            if message:
                rank_zero_warn(message)
