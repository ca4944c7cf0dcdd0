"""``TapsModule``: the LightningModule that trains TAPS and its baselines on many tasks.

The one Lightning file of the package. It owns the loss (cross-entropy + ``lam`` x the
model's regulariser), the per-task torchmetrics, the optimizer and the schedule. Everything
that differs between modes (which :class:`~taps_lightning.models.multitask.MultiTaskModel` to build,
phases, the progressive grouping) is asked of the mode's strategy object
(:mod:`taps_lightning.training.modes`).

Training batches are ``{task: (images, labels)}`` (one sub-batch per task, as Lightning's
``CombinedLoader`` yields them); validation and test use one dataloader per task.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .budget import BUDGET_MONITOR, DEFAULT_BUDGET_RATE, create_lambda_policy
from .checks import SettingsError, class_name_changes, data_class_names, normalize_sha256
from ..core.config import SCORE_INIT, THRESHOLD
from ..models.factory import check_weights_file, create_backbone, input_mean_std
from .modes import MODES, TAPS_MODES, mode_class
from .recalibrate import recalibrate_norms
from .schedules import ResumableLambdaLR, cosine_restart
from .settings import (DEFAULT_RECALIBRATE_BATCHES, EvaluationSettings, GateSettings, ModeSettings,
                       OptimizerSettings, check_settings)
from ..models.stats import GateFlipCounter

__all__ = ["TapsModule", "MODES", "TAPS_MODES", "DEFAULT_RECALIBRATE_BATCHES"]



class TapsModule(L.LightningModule):
    """Trains one backbone on several tasks with TAPS or a baseline.

    Args:
        backbone: timm model name (``timm.list_models()``).
        tasks: ``{task: num_classes}``; ``experiments.fit`` fills it from the DataModule.
        mode: ``incremental`` (Eq. 3: frozen base, each task adapts on its own),
            ``joint`` (Eq. 4: base trained with all tasks), ``memory_efficient`` (Sec. 3.3: the
            base and task heads/norms trained jointly for ``joint_epochs``, then incremental
            TAPS on that base), ``finetune`` (a full copy per task), ``linear`` (frozen
            feature extractor, heads only), ``joint_finetune`` (one shared backbone, heads),
            ``progressive`` (progressive task-specific LoRA adapters grouped by gradient similarity).
        lam: ``lambda``, weight of the sparsity penalty ``(1/L) sum |s|`` (not used with a ``budget``).
        penalty_divisor: divide ``sum |s|`` by this instead of ``L`` (the authors' script: 52).
        penalty: ``layers`` (the paper's ``(1/L) sum |s_i|``: every layer costs the same) or
            ``params`` (``sum (n_i/N) |s_i|``: each layer costs its share of the gated weights).
            Default: ``params`` with a ``budget`` (the Lagrangian of "stored fraction <= budget"
            is exactly that sum), ``layers`` without.
        budget: storage budget ``F`` in (0, 1]: the fraction of the backbone's parameters each
            task may store. ``lambda`` then becomes per task and is adjusted every step by dual
            ascent (:class:`~taps_lightning.training.budget.BudgetController`, from 0 when the warm-up
            ends; ``lam`` is not used) so that each task ends at most at ``F``; at each epoch's
            end an over-budget task's lowest-score layers are switched off
            (:func:`~taps_lightning.training.budget.enforce_budget`), and checkpoints are ranked by
            ``val/budget_acc``, which puts every epoch over budget below every epoch within it.
        budget_rate: dual-ascent step: ``lambda`` added per step per unit of fraction over budget.
        threshold: ``tau``.
        score_init: initial layer score (above ``tau``: every layer starts task-specific).
        sparsity_warmup_epochs: epochs of TAPS training before the penalty starts (3: the authors'
            script penalises from epoch index ``warmup_epochs + 1`` = 3).
        joint_epochs: memory-efficient mode: length of the joint phase.
        lr: learning rate (SGD with momentum; the paper's optimiser).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (off: the authors' script builds plain-momentum SGD).
        weight_decay: applied to all trained weights except the scores.
        score_lr: learning rate of the scores (default: ``lr``).
        scheduler: ``cosine`` (per epoch, as the authors' ``CosineAnnealingLR``), ``cosine_step``
            (per optimizer step) or ``none``.
        cosine_epochs: length of the per-epoch cosine (default ``trainer.max_epochs``); the
            authors' script runs one epoch past its 30-epoch cosine, at learning rate 0.
        pretrained: load timm hub weights (downloads once; never in the tests).
        weights: local weights file for the backbone (see ``taps_lightning.load_weights``).
        weights_sha256: expected SHA-256 of ``weights``; a different file is refused.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 64}``).
        adapter_rank: progressive mode: LoRA rank.
        num_stages: progressive mode: stages the adapted layers are split into.
        adapter_schedule: progressive mode: adapters per stage (default 1, 2, 4, ..., n_tasks).
        similarity_epochs: progressive mode: warm-up epochs with all adapters shared; task
            gradients are collected during the last of them and tasks grouped at its end.
        similarity_batches: progressive mode: batches whose gradients measure task similarity.
        recompute_weight: TAPS modes: rebuild each gated weight in backward instead of saving
            it from forward (less memory, one add more per active layer; see the README's
            Performance section).
        recalibrate_batches: before every validation and test (and so before every checkpoint
            and export), re-estimate each task's own BatchNorm statistics on this many batches of
            its training images under the evaluation transform
            (:func:`~taps_lightning.recalibrate_norms`); 0 keeps the training-time running
            averages, which go stale when gates flip late in an epoch.
        freeze_gates_epochs: TAPS modes: keep every gate as it is during the last this many
            epochs (the scores get no update; deltas, norms and heads keep training), so the
            selection settles before the end.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        tasks: dict[str, int] | None = None,
        mode: str = "incremental",
        lam: float = 0.5,
        threshold: float = THRESHOLD,
        score_init: float = SCORE_INIT,
        sparsity_warmup_epochs: int = 3,
        joint_epochs: int = 1,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        score_lr: float | None = None,
        scheduler: str = "cosine",
        cosine_epochs: int | None = None,
        penalty_divisor: float | None = None,
        penalty: str | None = None,
        budget: float | None = None,
        budget_rate: float = DEFAULT_BUDGET_RATE,
        pretrained: bool = False,
        weights: str | None = None,
        weights_sha256: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        adapter_rank: int = 8,
        num_stages: int = 4,
        adapter_schedule: list[int] | None = None,
        similarity_epochs: int = 1,
        similarity_batches: int = 8,
        recompute_weight: bool = True,
        recalibrate_batches: int = DEFAULT_RECALIBRATE_BATCHES,
        freeze_gates_epochs: int = 0,
    ) -> None:
        # the arguments as given (LightningCLI records those as hparams: ``hparams.penalty`` may be null)
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        mode_cls = mode_class(mode)  # before anything else: the flag's allowed values
        if not tasks:
            raise ValueError("no tasks: give `tasks={name: num_classes}` (experiments.fit takes them from --data)")
        if penalty is None:
            penalty = "params" if budget is not None else "layers"
        weights_sha256 = normalize_sha256(weights_sha256)
        self.save_hyperparameters()
        # the settings in typed groups, each checking its own ranges; every problem refused at once
        arguments.update(penalty=penalty, weights_sha256=weights_sha256)  # resolved
        self.optimizer_settings = OptimizerSettings.of(arguments)
        self.gate_settings = GateSettings.of(arguments)
        mode_settings = ModeSettings.of(arguments)
        check_settings(self.optimizer_settings, mode_settings, self.gate_settings, EvaluationSettings.of(arguments),
                       learns_gates=mode_cls.learns_gates)
        if weights is not None:
            check_weights_file(weights, weights_sha256)
        net = create_backbone(backbone, pretrained=pretrained, weights=weights, **(timm_kwargs or {}))
        self.input_mean_std = input_mean_std(net)  # what experiments.fit normalises the data with
        self.tasks = dict(tasks)
        self.mode = mode_cls(mode_settings)
        self.model = self.mode.build(net, self.tasks)
        #: each task's ``lambda``, and everything a storage budget decides (:mod:`~taps_lightning.training.budget`)
        gates = self.gate_settings
        self.lam_policy = create_lambda_policy(
            self.tasks, gates.lam, gates.budget, gates.budget_rate,
            minimum=lambda: {t: sum(self.model.norm_and_head_params(t)) / self.model.base_param_count
                             for t in self.tasks})
        self.val_acc = self._metrics()
        self.test_acc = self._metrics()
        self._nonfinite: dict[str, Tensor] = {}
        #: batches each task's norms are re-estimated on (``experiments.evaluate --recalibrate_batches`` sets it)
        self.recalibrate_batches = recalibrate_batches
        #: ``{task: images}`` the norms of the evaluated weights were re-estimated on (empty: not re-estimated)
        self.recalibrated_images: dict[str, int] = {}
        self._norms_fresh = False  # statistics re-estimated for the weights as they are now
        self._gate_flips = GateFlipCounter()

    def _metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({t: MulticlassAccuracy(num_classes=n, average="micro") for t, n in self.tasks.items()})

    @property
    def is_taps(self) -> bool:
        return self.mode.learns_gates

    @property
    def similarity(self) -> dict[int, Tensor]:
        """Progressive adapters: each stage's task-gradient cosine similarities (after grouping)."""
        return self.mode.similarity

    @property
    def grouping_epoch(self) -> int | None:
        return self.mode.grouping_epoch

    # -- phases --------------------------------------------------------------------------
    def taps_start_epoch(self) -> int:
        """First epoch in which TAPS gates train (later than 0 only in memory-efficient mode)."""
        return self.mode.taps_start_epoch()

    def task_lam(self, task: str) -> float | None:
        """The ``lambda`` ``task`` trains with once the penalty applies (with a budget, the
        controller's latest); ``None`` in modes without gates."""
        return self.lam_policy.lam(task) if self.is_taps else None

    def _fractions(self, tasks) -> dict[str, float]:
        return {task: float(self.task_cost(task)["fraction"]) for task in tasks}

    def within_budget(self) -> dict[str, bool] | None:
        """``{task: stores at most the budget}`` under the current gates; ``None`` without a budget."""
        return self.lam_policy.within(self._fractions(self.tasks)) if self.lam_policy.budget is not None else None

    def _step_lams(self, tasks, batch_idx: int) -> dict[str, float]:
        """Each task's ``lambda`` for this batch, from :attr:`lam_policy` (0 until the penalty
        applies). With a budget, the controller takes one dual-ascent step from the current
        fractions once per optimizer step (the first batch of an accumulation), and both are
        logged as ``taps/<task>/lam`` and ``taps/<task>/task_params_fraction``."""
        budget = self.lam_policy.budget is not None
        fractions = self._fractions(tasks) if budget else {task: math.nan for task in tasks}
        new_step = batch_idx % max(1, self._trainer.accumulate_grad_batches if self._trainer else 1) == 0
        lams = self.lam_policy.step(fractions, self.mode.penalty_active(self.current_epoch), new_step)
        if not budget:
            return lams
        for task in tasks:
            self.log(f"taps/{task}/lam", lams[task], on_step=True, on_epoch=False, batch_size=1)
            self.log(f"taps/{task}/task_params_fraction", fractions[task], on_step=True, on_epoch=False, batch_size=1)
        return lams

    # -- Lightning hooks -------------------------------------------------------------------
    def _datamodule(self):
        """The attached trainer's DataModule, if any."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        data_classes = getattr(self._datamodule(), "num_classes", None)
        if data_classes is not None and dict(data_classes) != self.tasks:
            raise ValueError(
                f"the model's tasks {self.tasks} disagree with the data's {dict(data_classes)}; "
                "let experiments.fit fill --model.tasks from --data, or fix the head sizes"
            )
        self.mode.enter_epoch(self.model, self.current_epoch)

    def on_fit_start(self) -> None:
        t = self.trainer
        rank_zero_info(
            f"TAPS | backbone={self.hparams.backbone} mode={self.hparams.mode} tasks={self.tasks} "
            + f"{self.lam_policy.describe()} "
            + (f"penalty={self.gate_settings.penalty} " if self.is_taps else "")
            + f"device={self.device.type} x{t.world_size} precision={t.precision} "
            f"epochs={t.max_epochs}"
        )

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path is not None:  # resumed: Lightning has just restored the optimizer's state
            self._apply_optimizer_settings()

    def _apply_optimizer_settings(self) -> None:
        """Give the optimizer this run's flags again. Restoring a checkpoint replaces the optimizer's
        param groups whole (rates, momentum, weight decay), so a resume with another ``--model.lr``
        would otherwise train on with the checkpoint's. The schedule keeps its position and takes
        the new base rates; with the same flags nothing changes, bit for bit."""
        opt = self.optimizer_settings
        optimizer = self.trainer.optimizers[0]
        for group, (rate, decay) in zip(optimizer.param_groups, self._group_rates()):
            group.update(momentum=opt.momentum, nesterov=opt.sgd_nesterov, weight_decay=decay, lr=rate)
        configs = self.trainer.lr_scheduler_configs
        if configs:  # the rates at the schedule's position, from the new base rates
            configs[0].scheduler.rebase([rate for rate, _ in self._group_rates()][:len(optimizer.param_groups)])

    def _group_rates(self) -> list[tuple[float, float]]:
        """(learning rate, weight decay) of the optimizer's groups: the trained weights', the scores'."""
        opt = self.optimizer_settings
        return [(opt.lr, opt.weight_decay), (opt.scores_lr, 0.0)]

    def on_fit_end(self) -> None:
        ckpt = self.trainer.checkpoint_callback  # a budget run whose best checkpoint is still over budget
        message = (self.lam_policy.missed_message(ckpt.best_model_score)
                   if ckpt is not None and ckpt.monitor == BUDGET_MONITOR else None)
        if message:
            rank_zero_warn(message)

    def on_train_epoch_start(self) -> None:
        self.mode.enter_epoch(self.model, self.current_epoch)
        if self.is_taps:  # gate flips are counted against the previous step's gates
            self._gate_flips.start(self.model, self.tasks)

    def gates_frozen(self) -> bool:
        """Whether this epoch is one of the last ``freeze_gates_epochs`` (scores not updated)."""
        k, epochs = self.gate_settings.freeze_gates_epochs, self.trainer.max_epochs if self._trainer else None
        return bool(k) and self.is_taps and epochs is not None and epochs > 0 and self.current_epoch >= epochs - k

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.gates_frozen():  # SGD skips a parameter without a gradient: no step, no momentum
            for p in self.model.score_parameters():
                p.grad = None

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.model(x, task)

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        lams = self._step_lams(list(batch), batch_idx)
        gates = self.gate_settings
        losses, sparsities = {}, []
        for task, (x, y) in batch.items():
            loss = F.cross_entropy(self.model(x, task), y)
            penalty = self.model.regularizer(task, gates.penalty_divisor, gates.penalty) if self.is_taps else None
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
                "or use --trainer.precision 32-true"
            )
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

    def on_train_epoch_end(self) -> None:
        for task, flips in self._gate_flips.flips.items():  # gate changes between optimizer steps, this epoch
            self.log(f"taps/{task}/gate_flips", flips.float(), on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True)  # the same on every rank (the scores are)
        message = self.mode.end_epoch(self.model, self.current_epoch,
                                      lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if message:
            rank_zero_info(message)

    # -- budgets: every state fit validates or checkpoints meets the budget ----------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # the epoch's last batch: before validation and ModelCheckpoint see the weights (Lightning
        # runs both before the module's on_train_epoch_end)
        if self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches:
            self._enforce_budget()
        self._norms_fresh = False  # the weights moved: statistics are re-estimated before the next evaluation
        self._gate_flips.step(self.model)

    def on_validation_start(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._enforce_budget()  # also a mid-epoch validation (--trainer.val_check_interval)
        self.recalibrate_norms()  # after enforcement: the statistics of the gates validated

    def on_test_start(self) -> None:
        self.recalibrate_norms()

    def recalibrate_norms(self) -> dict[str, int]:
        """Re-estimate every task's own BatchNorm statistics for the current weights on
        ``recalibrate_batches`` batches of its training images (evaluation transform, the same
        images every time, sharded over DDP ranks and averaged, so every rank ends with the same
        statistics); returns ``{task: images}``. A no-op when already done for these weights, with
        0 batches, without a DataModule, or for tasks without BatchNorm of their own. The training
        trajectory is untouched: no gradient, the training loader and the global RNG are not used."""
        dm = self._datamodule()
        if self._norms_fresh:
            return self.recalibrated_images
        if not self.recalibrate_batches or dm is None or not hasattr(dm, "norm_dataloader"):
            self.recalibrated_images = {}  # the statistics are the ones stored with the weights
            return self.recalibrated_images
        trainer, images = self.trainer, {}
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        with torch.random.fork_rng(devices=[]), \
                trainer.precision_plugin.forward_context():
            for task in self.eval_tasks():
                if not self.model.task_batchnorms(task):
                    continue
                try:
                    loader = dm.norm_dataloader(task, self.recalibrate_batches, trainer.global_rank, trainer.world_size)
                except (OSError, ValueError) as err:  # e.g. evaluating on data without its training split
                    raise type(err)(f"{err}\n(re-estimating {task}'s BatchNorm statistics needs its training images; "
                                    "to keep the statistics stored with the weights instead, pass "
                                    "--model.recalibrate_batches 0, or --recalibrate_batches 0 to evaluate)") from err
                batches = (batch[0].to(self.device, non_blocking=True) for batch in loader if batch is not None)
                images[task] = recalibrate_norms(self.model, task, batches, reduce)
        self.recalibrated_images, self._norms_fresh = images, True
        return images

    def _enforce_budget(self) -> None:
        """Switch off each over-budget task's lowest-score layers once the penalty applies. The
        scores are the same on every rank, so every rank switches off the same layers."""
        for message in self.lam_policy.enforce(self.model, self.tasks, self.mode.penalty_active(self.current_epoch)):
            rank_zero_info(message)

    def _eval_step(self, metrics: nn.ModuleDict, batch, dataloader_idx: int) -> None:
        x, y = batch
        task = self.eval_tasks()[dataloader_idx]
        logits = self.model(x, task)
        # counted on the device (no sync per step); checked once per epoch in _log_accuracies
        bad = (~torch.isfinite(logits)).flatten(1).any(1).sum()
        self._nonfinite[task] = self._nonfinite.get(task, 0) + bad
        metrics[task].update(logits.argmax(-1), y)

    def _check_finite_eval(self, stage: str) -> None:
        """Stop the run if any evaluated sample had non-finite logits (on any rank): an argmax of
        NaN is a number, and the model would otherwise be logged, checkpointed and kept as best."""
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

    def eval_metrics(self, stage: str) -> nn.ModuleDict:
        """``{task: accuracy metric}`` of ``stage`` (``val`` or ``test``), for callbacks to read
        at epoch end before the module resets them."""
        return self.val_acc if stage == "val" else self.test_acc

    def eval_tasks(self) -> list[str]:
        """Task of each validation/test dataloader, in order."""
        return list(getattr(self._datamodule(), "tasks", None) or self.tasks)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_acc, batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_acc, batch, dataloader_idx)

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
        mean_acc = torch.stack(list(accs.values())).mean() if accs else None
        if mean_acc is not None:
            self.log(f"{stage}/acc", mean_acc, prog_bar=True, sync_dist=True)
        if self.is_taps:
            fractions = {}
            for task in self.tasks:
                cost = self.task_cost(task)
                fractions[task] = float(cost["fraction"])
                self.log(f"{stage}/{task}/active_layers", float(cost["active_layers"]), sync_dist=True)
                self.log(f"{stage}/{task}/task_params_fraction", fractions[task], sync_dist=True)
            score = (self.lam_policy.rank_score(mean_acc, fractions, self.mode.penalty_active(self.current_epoch))
                     if mean_acc is not None else None)
            if score is not None:  # budget runs: what ModelCheckpoint ranks (val/budget_acc)
                self.log(f"{stage}/budget_acc", score, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracies(self.val_acc, "val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracies(self.test_acc, "test")

    # -- costs -----------------------------------------------------------------------------
    def task_cost(self, task: str) -> dict[str, float]:
        """``active_layers``, ``gated_layers``, ``task_params``, ``base_params``, ``fraction`` in every
        mode, as the current phase has them (see :meth:`MultiTaskModel.task_cost`)."""
        return self.mode.task_cost(self.model, task, self.current_epoch)

    def total_params_multiple(self) -> float:
        """Base plus every task-specific parameter, each counted once, in backbones (the paper's
        "Params" column). Progressive adapters shared by several tasks count once, although each
        task's :meth:`task_cost` includes them (the task needs them to run)."""
        if self.current_epoch < self.taps_start_epoch():  # phase-dependent costs
            costs = [self.task_cost(task) for task in self.tasks]
            return (costs[0]["base_params"] + sum(c["task_params"] for c in costs)) / costs[0]["base_params"]
        return self.model.total_params_multiple()

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_settings
        params = self.mode.optimizer_parameters(self.model)
        score_ids = {id(p) for p in self.model.score_parameters()}
        scores = [p for _, p in params if id(p) in score_ids]
        others = [p for _, p in params if id(p) not in score_ids]
        (_, decay), (scores_lr, scores_decay) = self._group_rates()
        groups = [{"params": others, "weight_decay": decay}]
        if scores:
            groups.append({"params": scores, "weight_decay": scores_decay, "lr": scores_lr})
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.sgd_nesterov)
        if opt.scheduler == "none":
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        per_epoch = opt.scheduler == "cosine"
        total = (opt.cosine_epochs or epochs) if per_epoch else self.trainer.estimated_stepping_batches
        if not total or not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs a finite run of at least one epoch, but --trainer.max_epochs "
                f"{self.trainer.max_epochs} / max_steps {self.trainer.max_steps} give none or an endless one: "
                "set --trainer.max_epochs N (or --model.cosine_epochs N), or use --model.scheduler none")
        total = max(1, int(total))
        # memory-efficient: the TAPS phase is a run of its own on the jointly trained base, its own cosine cycle
        boundary = self.mode.schedule_boundary(total, epochs, per_epoch)
        # resumed with another length (more --trainer.max_epochs), it continues on this schedule at once
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
        # the data's class names: a resume or an evaluation on data whose classes changed is refused
        checkpoint["taps_class_names"] = data_class_names(self._datamodule(), self.tasks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._norms_fresh = False
        if "taps_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["taps_rng_state"])
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("backbone", "mode", "tasks", "threshold", "budget"):
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"checkpoint was trained with {key}={saved[key]!r} but this run has {key}={self.hparams[key]!r}; "
                    "resume with the same --model settings (e.g. --config of the original run) or start a new run"
                )
        changes = class_name_changes(checkpoint.get("taps_class_names") or {},
                                     data_class_names(self._datamodule(), self.tasks), "the checkpoint")
        if changes:
            raise SettingsError(changes)
        # a budget's lambdas, step sizes and steps carry on (the best checkpoint so far was ranked under it)
        self.lam_policy.load_state_dict(checkpoint.get("taps_budget"))
        changed = {k: (saved[k], v) for k, v in self.hparams.items() if k in saved and saved[k] != v}
        if changed:  # allowed (e.g. another lam or lr from here on), but never silently
            rank_zero_warn("resuming with changed --model settings, which apply from here on: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
