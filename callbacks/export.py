"""``TaskExport``: write each task's adapter (``save_task``) next to the checkpoints."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from taps_lightning import save_task
from taps_lightning.training.lightning_module import TapsModule

from .recalibration import NormRecalibration

__all__ = ["TaskExport", "adapter_dir"]


def adapter_dir(trainer: L.Trainer) -> Path:
    """``<checkpoint dir>/adapters`` (or ``<log dir>/adapters`` without a checkpoint callback)."""
    ckpt = trainer.checkpoint_callback
    base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else (trainer.log_dir or trainer.default_root_dir)
    return Path(base) / "adapters"


class TaskExport(L.Callback):
    """After fit (final weights) and again after test (the tested, usually best, weights),
    save every task as ``adapters/<task>.safetensors``, with the DataModule's class names when
    it knows them, and with norm statistics re-estimated for those weights
    (:class:`NormRecalibration`, done already when they were just evaluated). Rank zero
    writes; others wait."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def _export(self, trainer: L.Trainer, pl_module: TapsModule, when: str) -> None:
        model = pl_module.model
        if not model.can_export:
            return
        folder = adapter_dir(trainer)  # may ask trainer.log_dir, a collective: every rank
        recalibration = NormRecalibration.of(trainer)
        if recalibration is not None:  # norm statistics for these weights (a no-op if done)
            recalibration.recalibrate(trainer, pl_module)
        within = pl_module.lam_policy.within(pl_module.task_fractions())
        if within is not None and not all(within.values()) and when == "final weights":
            # a budget run exports only weights that meet the budget: the tested (best) ones follow
            rank_zero_info(f"TAPS | adapters not written for the final weights: over the budget for "
                           f"{', '.join(t for t, ok in within.items() if not ok)}; the best checkpoint's are "
                           "written after test (with --test false: save_task from best-*.ckpt, docs/use-trained.md)")
            return
        if trainer.is_global_zero:
            names = getattr(trainer.datamodule, "class_names", None)  # a DataModule's, stored so predictions can be named
            for task in model.tasks:
                self.paths[task] = save_task(model, task, folder / f"{task}.safetensors",
                                             class_names=names(task) if names else None)
            rank_zero_info(f"TAPS | adapters ({when}) written to {folder}")
        trainer.strategy.barrier("taps_export")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "final weights")

    def on_test_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "tested weights")
