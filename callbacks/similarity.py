"""``TaskSimilarityLogger``: the progressive adapters' task-similarity matrices and grouping."""
from __future__ import annotations

import lightning as L

from .report import grouping_markdown
from .selection import draw_heatmap

__all__ = ["TaskSimilarityLogger"]


class TaskSimilarityLogger(L.Callback):
    """Once the tasks have been grouped (after the shared warm-up), log each stage's gradient
    cosine-similarity matrix as the image ``progressive/similarity_stage<k>`` and the grouping
    as the text ``progressive/grouping`` to TensorBoard. Rank zero writes."""

    def __init__(self) -> None:
        self.logged = False

    def _log(self, trainer, pl_module) -> None:
        sims = pl_module.mode.similarity
        if self.logged or not sims or not trainer.is_global_zero:
            return
        tasks = pl_module.model.tasks
        step = pl_module.mode.grouping_epoch or 0
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if not hasattr(experiment, "add_image"):
                continue
            for stage, sim in sims.items():
                image = draw_heatmap(sim.numpy(), tasks, tasks, f"gradient cosine similarity, stage {stage}",
                                     threshold=0.0)
                experiment.add_image(f"progressive/similarity_stage{stage}", image, global_step=step,
                                     dataformats="HWC")
            experiment.add_text("progressive/grouping", grouping_markdown(pl_module), global_step=step)
        self.logged = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)
