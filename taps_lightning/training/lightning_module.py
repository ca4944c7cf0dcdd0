"""``TapsModule``: the LightningModule that trains a multi-task model (TAPS or a baseline).

The one Lightning file of the package. It receives what it trains (built from the flags by
:func:`~taps_lightning.training.compose.create_taps_module`) and owns five things: the loss
(cross-entropy + ``lambda`` x the model's regulariser), the per-task metrics, the optimizer and
its schedule, the mode's phases, and its own checkpoint state. What happens around training
(budget enforcement, norm re-estimation, resume guarding, gate-flip counts) is a callback of
:mod:`callbacks`; they reach the module only through the attributes and methods documented
here (:class:`TapsModule` is their interface).

Training batches are ``{task: (images, labels)}`` (one sub-batch per task, as Lightning's
``CombinedLoader`` yields them); validation and test use one dataloader per task.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..errors import CheckpointError, SettingsError
from ..models.multitask import MultiTaskModel
from .budget import LambdaPolicy
from .checks import resume_conflicts
from .modes import Mode
from .schedules import ResumableLambdaLR, cosine_restart
from .settings import EvaluationSettings, GateSettings, OptimizerSettings

__all__ = ["TapsModule"]


class TapsModule(L.LightningModule):
    """Trains ``model`` on its tasks as ``mode`` says, each task's ``lambda`` from ``lam_policy``.

    Args:
        model: the multi-task model (its tasks are the module's).
        mode: the training mode (:mod:`~taps_lightning.training.modes`): phases, penalty, parameters.
        lam_policy: each task's ``lambda`` (:class:`~taps_lightning.training.budget.FixedLambda`
            or, with a storage budget, :class:`~taps_lightning.training.budget.BudgetPolicy`).
        optimizer_settings: SGD and its schedule.
        gate_settings: the penalty and when the gates stop moving.
        evaluation_settings: what happens before evaluation (norm re-estimation's batch count).
        input_mean_std: what the data is normalised with (the backbone's ``pretrained_cfg``).

    Use :func:`~taps_lightning.training.compose.create_taps_module` to build one from flags, and
    :meth:`load_from_checkpoint` to rebuild one from a checkpoint.
    """

    def __init__(self, model: MultiTaskModel, mode: Mode, lam_policy: LambdaPolicy,
                 optimizer_settings: OptimizerSettings, gate_settings: GateSettings,
                 evaluation_settings: EvaluationSettings,
                 input_mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        self.model, self.mode, self.lam_policy = model, mode, lam_policy
        self.optimizer_settings, self.gate_settings = optimizer_settings, gate_settings
        self.evaluation_settings = evaluation_settings
        self.input_mean_std = input_mean_std
        self.val_acc = self._metrics()
        self.test_acc = self._metrics()
        self._nonfinite: dict[str, Tensor] = {}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location: Any = "cpu", **overrides: Any) -> "TapsModule":
        """The module a checkpoint of ``experiments.fit`` holds, rebuilt from its recorded flags
        (:func:`~taps_lightning.training.compose.module_from_checkpoint`; always ``weights_only``)."""
        overrides.pop("weights_only", None)  # always True
        from .compose import module_from_checkpoint  # the composition root builds the module it returns
        return module_from_checkpoint(checkpoint_path, map_location, **overrides)

    def _metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({t: MulticlassAccuracy(num_classes=n, average="micro")
                              for t, n in self.model.num_classes.items()})

    # -- what callbacks read ---------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The tasks, in the model's order."""
        return self.model.tasks

    def task_cost(self, task: str) -> dict[str, float]:
        """``active_layers``, ``gated_layers``, ``task_params``, ``base_params``, ``fraction`` in every
        mode, as the current phase has them (see :meth:`MultiTaskModel.task_cost`)."""
        return self.mode.task_cost(self.model, task, self.current_epoch)

    def task_fractions(self, tasks: list[str] | None = None) -> dict[str, float]:
        """``{task: stored fraction of the backbone}`` under the current gates."""
        return {task: float(self.task_cost(task)["fraction"]) for task in (tasks or self.tasks)}

    def total_params_multiple(self) -> float:
        """Base plus every task-specific parameter, each counted once, in backbones (the paper's
        "Params" column). Progressive adapters shared by several tasks count once, although each
        task's :meth:`task_cost` includes them (the task needs them to run)."""
        if self.current_epoch < self.mode.taps_start_epoch():  # phase-dependent costs
            costs = [self.task_cost(task) for task in self.tasks]
            return (costs[0]["base_params"] + sum(c["task_params"] for c in costs)) / costs[0]["base_params"]
        return self.model.total_params_multiple()

    def task_lam(self, task: str) -> float | None:
        """The ``lambda`` ``task`` trains with once the penalty applies (with a budget, the
        controller's latest); ``None`` in modes without gates."""
        return self.lam_policy.lam(task) if self.mode.learns_gates else None

    def penalty_active(self) -> bool:
        """Whether the sparsity penalty applies in the current epoch."""
        return self.mode.penalty_active(self.current_epoch)

    def eval_metrics(self, stage: str) -> nn.ModuleDict:
        """``{task: accuracy metric}`` of ``stage`` (``val`` or ``test``), for callbacks to read
        at epoch end before the module resets them."""
        return self.val_acc if stage == "val" else self.test_acc

    def eval_tasks(self) -> list[str]:
        """Task of each validation/test dataloader, in order."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return list(getattr(datamodule, "tasks", None) or self.tasks)

    # -- phases ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and dict(data_classes) != self.model.num_classes:
            raise SettingsError(
                f"the model's tasks {self.model.num_classes} disagree with the data's {dict(data_classes)}; "
                "let experiments.fit fill --model.tasks from --data, or fix the head sizes")
        epochs = self.trainer.max_epochs
        if stage == "fit" and epochs is not None and epochs > 0:  # a run of known length: nothing may do nothing
            problems = self.mode.run_length_problems(epochs, self.gate_settings.freeze_gates_epochs)
            if problems:  # warned, not refused: a short smoke run with the paper's warm-up is still a run
                rank_zero_warn("settings that do nothing in this run:\n  - " + "\n  - ".join(problems))
        self.mode.enter_epoch(self.model, self.current_epoch)

    def on_fit_start(self) -> None:
        t = self.trainer
        rank_zero_info(
            f"TAPS | backbone={self.model.backbone_name} mode={self.mode.name} tasks={self.model.num_classes} "
            + "".join(f"{part} " for part in self.mode.describe(self.lam_policy, self.gate_settings.penalty).split(", ") if part)
            + f"device={self.device.type} x{t.world_size} precision={t.precision} epochs={t.max_epochs}")

    def on_train_epoch_start(self) -> None:
        self.mode.enter_epoch(self.model, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        message = self.mode.end_epoch(self.model, self.current_epoch,
                                      lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if message:
            rank_zero_info(message)

    # -- the loss --------------------------------------------------------------------------
    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.model(x, task)

    def _step_lams(self, tasks: list[str], batch_idx: int) -> dict[str, float]:
        """Each task's ``lambda`` for this batch, from :attr:`lam_policy` (0 until the penalty
        applies). With a budget, the controller takes one dual-ascent step from the current
        fractions once per optimizer step (the first batch of an accumulation), and both are
        logged as ``taps/<task>/lam`` and ``taps/<task>/task_params_fraction``."""
        budget = self.lam_policy.budget is not None
        fractions = self.task_fractions(tasks) if budget else {task: math.nan for task in tasks}
        new_step = batch_idx % max(1, self._trainer.accumulate_grad_batches if self._trainer else 1) == 0
        lams = self.lam_policy.step(fractions, self.penalty_active(), new_step)
        if budget:
            for task in tasks:
                self.log(f"taps/{task}/lam", lams[task], on_step=True, on_epoch=False, batch_size=1)
                self.log(f"taps/{task}/task_params_fraction", fractions[task], on_step=True, on_epoch=False,
                         batch_size=1)
        return lams

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        lams = self._step_lams(list(batch), batch_idx)
        gates = self.gate_settings
        losses, sparsities = {}, []
        for task, (x, y) in batch.items():
            loss = F.cross_entropy(self.model(x, task), y)
            penalty = self.model.regularizer(task, gates.penalty_divisor, gates.penalty) if self.mode.learns_gates else None
            if penalty is not None:
                sparsities.append(penalty.detach())
                loss = loss + lams[task] * penalty
            losses[task] = loss
        stacked = torch.stack(list(losses.values()))
        if not bool(torch.isfinite(stacked).all()):
            bad = [t for t, l in losses.items() if not torch.isfinite(l)]
            raise FloatingPointError(
                f"non-finite loss at epoch {self.current_epoch}, global step {self.global_step}, batch {batch_idx}, "
                f"task(s) {bad}: {[losses[t].item() for t in bad]}. Lower --model.lr, check the data of that task, "
                "or use --trainer.precision 32-true")
        if self.mode.collects_gradients(self.model, self.current_epoch, batch_idx):
            self.mode.collect(self.model, losses)
        total = stacked.sum()
        bs = sum(len(y) for _, y in batch.values())
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/loss_epoch", total, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        for task, loss in losses.items():
            self.log(f"train/{task}/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[task][1]),
                     sync_dist=True)
        if sparsities:
            self.log("train/sparsity", torch.stack(sparsities).mean(), on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)
            self.log("train/lam", sum(lams.values()) / len(lams), on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)
        return total

    # -- the metrics -----------------------------------------------------------------------
    def _eval_step(self, metrics: nn.ModuleDict, batch, dataloader_idx: int) -> None:
        x, y = batch
        task = self.eval_tasks()[dataloader_idx]
        logits = self.model(x, task)
        # counted on the device (no sync per step); checked once per epoch in _log_accuracies
        bad = (~torch.isfinite(logits)).flatten(1).any(1).sum()
        self._nonfinite[task] = self._nonfinite.get(task, 0) + bad
        metrics[task].update(logits.argmax(-1), y)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_acc, batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_acc, batch, dataloader_idx)

    def _check_finite_eval(self, stage: str) -> None:
        """Stop if any evaluated sample had non-finite logits (on any rank): an argmax of NaN is a
        number, and the weights would otherwise be logged, checkpointed and kept as best."""
        counts, self._nonfinite = self._nonfinite, {}
        tasks = self.eval_tasks()
        local = torch.stack([torch.as_tensor(counts.get(t, 0), device=self.device).float() for t in tasks])
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self._trainer is not None else local
        bad = {t: int(n) for t, n in zip(tasks, total.tolist()) if n > 0}
        if bad:
            raise FloatingPointError(
                f"non-finite logits in {stage} at epoch {self.current_epoch} (global step {self.global_step}): "
                + ", ".join(f"{t}: {n} samples" for t, n in bad.items())
                + ". The weights have diverged; the run is stopped so that this state is neither checkpointed nor "
                "kept as best. Lower --model.lr, check the data, or use --trainer.precision 32-true; "
                "resume from an earlier checkpoint with --ckpt_path")

    def _log_accuracies(self, metrics: nn.ModuleDict, stage: str) -> None:
        self._check_finite_eval(stage)
        accs = {}
        for task, metric in metrics.items():
            if metric.update_called:
                accs[task] = metric.compute()  # synchronised over DDP ranks by torchmetrics
                if not bool(torch.isfinite(accs[task])):
                    raise FloatingPointError(f"{stage}/{task}/acc is {accs[task].item()}; the run is stopped")
                self.log(f"{stage}/{task}/acc", accs[task], sync_dist=True)
            metric.reset()
        if accs:
            self.log(f"{stage}/acc", torch.stack(list(accs.values())).mean(), prog_bar=True, sync_dist=True)
        if self.mode.learns_gates:
            for task in self.tasks:
                cost = self.task_cost(task)
                self.log(f"{stage}/{task}/active_layers", float(cost["active_layers"]), sync_dist=True)
                self.log(f"{stage}/{task}/task_params_fraction", float(cost["fraction"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracies(self.val_acc, "val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracies(self.test_acc, "test")

    # -- the optimizer and its schedule ----------------------------------------------------
    def param_group_settings(self) -> list[dict[str, Any]]:
        """``lr``, ``momentum``, ``nesterov`` and ``weight_decay`` of the optimizer's groups: the
        trained weights', then the scores' (what a resume re-applies, :class:`callbacks.ResumeGuard`)."""
        opt = self.optimizer_settings
        common = {"momentum": opt.momentum, "nesterov": opt.sgd_nesterov}
        return [{**common, "lr": opt.lr, "weight_decay": opt.weight_decay},
                {**common, "lr": opt.scores_lr, "weight_decay": 0.0}]

    def gates_frozen(self) -> bool:
        """Whether this epoch is one of the last ``freeze_gates_epochs`` (scores not updated)."""
        k, epochs = self.gate_settings.freeze_gates_epochs, self.trainer.max_epochs if self._trainer else None
        return (bool(k) and self.mode.learns_gates and epochs is not None and epochs > 0
                and self.current_epoch >= epochs - k)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.gates_frozen():  # SGD skips a parameter without a gradient: no step, no momentum
            for p in self.model.score_parameters():
                p.grad = None

    def configure_optimizers(self):
        opt = self.optimizer_settings
        params = self.mode.optimizer_parameters(self.model)
        score_ids = {id(p) for p in self.model.score_parameters()}
        trained, scores = self.param_group_settings()
        groups = [{"params": [p for _, p in params if id(p) not in score_ids], "weight_decay": trained["weight_decay"]}]
        score_params = [p for _, p in params if id(p) in score_ids]
        if score_params:
            groups.append({"params": score_params, "weight_decay": scores["weight_decay"], "lr": scores["lr"]})
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.sgd_nesterov)
        if opt.scheduler == "none":
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        per_epoch = opt.scheduler == "cosine"
        total = (opt.cosine_epochs or epochs) if per_epoch else self.trainer.estimated_stepping_batches
        if not total or not math.isfinite(total):
            raise SettingsError(
                "the cosine schedule needs a finite run of at least one epoch, but --trainer.max_epochs "
                f"{self.trainer.max_epochs} / max_steps {self.trainer.max_steps} give none or an endless one: "
                "set --trainer.max_epochs N (or --model.cosine_epochs N), or use --model.scheduler none")
        total = max(1, int(total))
        # memory-efficient: the TAPS phase is a run of its own on the jointly trained base, its own cosine cycle
        boundary = self.mode.schedule_boundary(total, epochs, per_epoch)
        unit = "epoch" if per_epoch else "step"
        described = f"a cosine over {total} {unit}{'s' * (total != 1)}"
        described += f", restarted at {boundary}" if boundary else ""
        scheduler = ResumableLambdaLR(optimizer, lambda i: cosine_restart(i, boundary, total), described, unit)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch" if per_epoch else "step"}}

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The global RNG drives shuffling and augmentation: restoring it makes a resumed run
        # continue exactly as an uninterrupted one (single process, num_workers=0).
        checkpoint["taps_rng_state"] = torch.get_rng_state()
        budget_state = self.lam_policy.state_dict()
        if budget_state is not None:  # per-task lambdas: a resumed run continues the controller
            checkpoint["taps_budget"] = budget_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before Lightning loads the weights: a checkpoint of another backbone, mode, task set,
        # threshold or budget is refused by name, not by a wall of missing keys
        problems = resume_conflicts(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), "the checkpoint")
        if problems:
            raise CheckpointError("cannot load the checkpoint into this module:\n  - " + "\n  - ".join(problems))
        if "taps_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["taps_rng_state"])
        # a budget's lambdas, step sizes and steps carry on (the best checkpoint so far was ranked under it)
        self.lam_policy.load_state_dict(checkpoint.get("taps_budget"))
