"""Lightning callbacks.

What happens around training, in the order it must (:func:`lifecycle_callbacks`): budget
enforcement, norm re-estimation, gate-flip counts and resume guarding. What a run shows and
writes: layer-selection heatmaps, parameter counts, the Decathlon score, task-file export and
the results report. Each reaches the module only through :class:`~taps_lightning.training.lightning_module.TapsModule`'s
documented attributes.
"""
from __future__ import annotations

from .budget import BudgetEnforcement
from .decathlon import DecathlonScore, decathlon_score
from .export import TaskExport
from .gates import GateFlipLogger
from .params import TaskParamLogger
from .recalibration import NormRecalibration
from .report import ResultsReport
from .resume import ResumeGuard
from .selection import LayerSelectionLogger
from .similarity import TaskSimilarityLogger

__all__ = ["lifecycle_callbacks", "BudgetEnforcement", "NormRecalibration", "GateFlipLogger", "ResumeGuard",
           "TaskExport", "ResultsReport", "LayerSelectionLogger", "TaskParamLogger", "DecathlonScore",
           "TaskSimilarityLogger", "decathlon_score"]


def lifecycle_callbacks(recalibrate_batches: int | None = None) -> list:
    """The callbacks a :class:`~taps_lightning.training.lightning_module.TapsModule` trains and evaluates correctly with, in
    their required order: budget enforcement before norm re-estimation (the statistics are those
    of the gates validated), both before checkpointing (Lightning runs ``ModelCheckpoint`` after
    every other callback). Pass them to a hand-built ``Trainer`` (``experiments.fit`` adds them).

    Args:
        recalibrate_batches: norm re-estimation's batches per task (``None``: the module's
            ``--model.recalibrate_batches``; ``experiments.evaluate --recalibrate_batches`` sets it).
    """
    return [BudgetEnforcement(), NormRecalibration(recalibrate_batches), GateFlipLogger(), ResumeGuard()]
