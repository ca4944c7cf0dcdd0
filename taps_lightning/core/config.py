"""The TAPS settings in one place (as PEFT's ``LoraConfig``): every gated layer reads the same
object, so a setting lives in one field instead of in every layer and signature."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import SettingsError

__all__ = ["TapsConfig", "threshold_problems", "CONV_TYPES", "GATED_TYPES", "THRESHOLD", "SCORE_INIT", "StartsOffWarning"]

#: The paper's threshold ``tau`` and the authors' initial score (above tau: every layer starts active).
THRESHOLD = 0.1
SCORE_INIT = 0.15

#: Convolutions TAPS gates (and their subclasses, through their own forward).
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Every module type TAPS gates.
GATED_TYPES: tuple[type, ...] = CONV_TYPES + (nn.Linear,)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def threshold_problems(threshold, score_init) -> list[str]:
    """What is wrong with ``tau`` and the initial score, one line each naming the flag: ``tau``
    must be a finite number above 0 (the penalty drives scores to 0, so a layer can only switch
    off below a positive ``tau``; at ``tau <= 0`` every gate is open for ever) and the initial
    score finite. (A start below ``tau`` is :class:`StartsOffWarning`'s, or a training setting's.)"""
    found = []
    if not (_finite(threshold) and threshold > 0):
        found.append(f"--model.threshold (tau) must be a finite number > 0 (the penalty drives scores to 0, so a "
                     f"layer can only switch off below a positive tau; paper: 0.1), got {threshold}")
    if not _finite(score_init):
        found.append(f"--model.score_init must be a finite number, got {score_init}")
    return found


class StartsOffWarning(UserWarning):
    """A new task whose layers start off (``score_init < threshold``) and can never switch on."""


@dataclass
class TapsConfig:
    """What every TAPS layer of a model shares.

    Args:
        threshold: ``tau``; a layer is task-specific for a task when its score is ``>= tau``.
        score_init: initial score of each layer for a new task (``>= tau``: it starts active).
        recompute_weight: in training, rebuild each gated weight in backward instead of keeping
            it from forward (one weight copy less per active layer, one add more).
    """

    threshold: float = THRESHOLD
    score_init: float = SCORE_INIT
    recompute_weight: bool = True

    def __post_init__(self) -> None:
        problems = threshold_problems(self.threshold, self.score_init)
        if problems:
            raise SettingsError("invalid TAPS settings:\n  - " + "\n  - ".join(problems))
        self.threshold, self.score_init = float(self.threshold), float(self.score_init)

    def warn_if_starts_off(self, task: str) -> None:
        """Warn that a new ``task`` can never switch a layer on when ``score_init < threshold``: its
        deltas start at zero, so each score's gradient ``<dL/dw, delta>`` is 0 and no score can
        rise to ``tau`` (a model that only carries tasks loaded from files is not affected)."""
        if self.score_init < self.threshold:
            warnings.warn(
                f"score_init {self.score_init} < threshold {self.threshold}: every layer of task {task!r} starts off "
                "with a zero delta, so its score gradient <dL/dw, delta> is 0 and no layer can ever switch on (only "
                "its norms and head would train). Use score_init >= threshold (paper: 0.15 and 0.1)",
                StartsOffWarning, stacklevel=3)
