"""The TAPS settings in one place (as PEFT's ``LoraConfig``): every gated layer reads the same
object, so a setting lives in one field instead of in every layer and signature."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from torch import nn

__all__ = ["TapsConfig", "CONV_TYPES", "GATED_TYPES", "THRESHOLD", "SCORE_INIT", "StartsOffWarning"]

#: The paper's threshold ``tau`` and the authors' initial score (above tau: every layer starts active).
THRESHOLD = 0.1
SCORE_INIT = 0.15

#: Convolutions TAPS gates (and their subclasses, through their own forward).
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Every module type TAPS gates.
GATED_TYPES: tuple[type, ...] = CONV_TYPES + (nn.Linear,)


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
        self.threshold, self.score_init = float(self.threshold), float(self.score_init)
        if not math.isfinite(self.threshold) or not math.isfinite(self.score_init):
            raise ValueError(f"threshold and score_init must be finite, got {self.threshold} and {self.score_init}")

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
