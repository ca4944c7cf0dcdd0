"""``DecathlonScore``: the Visual Decathlon S-score of the tasks a run has."""
from __future__ import annotations

from typing import Mapping

import lightning as L

__all__ = ["DecathlonScore", "decathlon_score", "BASELINE_ERRORS"]

#: Test error (fraction) of the "Finetune" baseline of Rebuffi et al. 2017, Table 1.
BASELINE_ERRORS = {
    "imagenet12": 0.4013, "aircraft": 0.3966, "cifar100": 0.1788, "daimlerpedcls": 0.0718, "dtd": 0.4447,
    "gtsrb": 0.0247, "vgg-flowers": 0.1859, "omniglot": 0.1231, "svhn": 0.0345, "ucf101": 0.4880,
}


def decathlon_score(errors: Mapping[str, float], baseline: Mapping[str, float] = BASELINE_ERRORS,
                    gamma: float = 2.0) -> float:
    """``S = sum_d alpha_d * max(0, E_max_d - E_d) ** gamma``, ``E_max = 2 * baseline error``,
    ``alpha_d = 1000 * E_max_d ** -gamma`` (1000 points for a perfect task, 250 for the baseline).

    Args:
        errors: ``{task: test error as a fraction}``; tasks without a baseline are ignored.
    """
    score = 0.0
    for task, err in errors.items():
        if task not in baseline:
            continue
        e_max = 2.0 * baseline[task]
        score += 1000.0 * e_max ** -gamma * max(0.0, e_max - err) ** gamma
    return score


class DecathlonScore(L.Callback):
    """Logs ``<stage>/decathlon_score`` from the epoch's accuracy of the Decathlon tasks present
    (read from the module's torchmetrics objects, which callbacks see before the module resets them)."""

    def _log(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        metrics = pl_module.eval_metrics(stage)
        errors = {t: 1.0 - float(m.compute()) for t, m in metrics.items()
                  if t in BASELINE_ERRORS and m.update_called}
        if errors:
            pl_module.log(f"{stage}/decathlon_score", decathlon_score(errors), sync_dist=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test")
