"""A learning-rate schedule that a resumed run continues on the schedule it was built with.

A run of one epoch with a one-epoch cosine ends at learning rate 0, and its checkpoint holds
that rate in the optimizer's state. Resumed with more epochs (``--trainer.max_epochs 2``), a plain
``LambdaLR`` gets the new, longer schedule but restores the old rate and applies the new one only
after the next epoch: that epoch trains at 0. :class:`ResumableLambdaLR` keeps the restored
position (``last_epoch``: epochs or steps done) and base rates, and sets the optimizer's rates
from *its own* schedule at that position as soon as it is loaded, so that one epoch, then a resume
to two, equals two epochs run straight, bit for bit.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .checks import SettingsError

__all__ = ["ResumableLambdaLR", "cosine_restart"]


def cosine_restart(step: int, boundary: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``[0, boundary)`` and again over ``[boundary, total)``
    (one plain cycle when ``boundary`` is 0)."""
    start, end = (0, boundary) if step < boundary else (boundary, total)
    length = max(1, end - start)
    return 0.5 * (1 + math.cos(math.pi * min(step - start, length) / length))


class ResumableLambdaLR(LambdaLR):
    """``LambdaLR`` whose ``load_state_dict`` continues on this schedule (see the module docstring).

    Args:
        optimizer: the optimizer.
        lr_lambda: factor of the base rates at each position (one function for every group).
        schedule: what defines ``lr_lambda`` (e.g. ``"a cosine over 30 epochs"``); stored in the
            state, so that a resume onto another schedule is reported, naming both.
        unit: what a position counts (``epoch`` or ``step``), for that report.
    """

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float], schedule: str,
                 unit: str = "step") -> None:
        self.schedule, self.unit = schedule, unit
        super().__init__(optimizer, lr_lambda)

    def rebase(self, base_lrs: list[float]) -> None:
        """Continue from the current position with other base rates (a resume with another
        ``--model.lr``); the optimizer's rates are set at once."""
        self.base_lrs = list(base_lrs)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base_lr
        self._set_rates()

    def _set_rates(self) -> None:
        rates = [base_lr * lmbda(self.last_epoch) for lmbda, base_lr in zip(self.lr_lambdas, self.base_lrs)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self._last_lr = rates

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        built = self.schedule
        super().load_state_dict(state_dict)  # position, base rates and the saved schedule
        saved, self.schedule = self.schedule, built
        # the optimizer's state (restored before this) holds the rate of the saved schedule: set this one's
        self._set_rates()
        if saved != built:
            factor = self.lr_lambdas[0](self.last_epoch)
            if factor == 0:
                raise SettingsError(
                    f"resumed after {self.last_epoch} {self.unit}(s) onto {built} (the checkpoint's: {saved}), which "
                    f"has ended: every further {self.unit} would train at learning rate 0. Set --model.cosine_epochs "
                    f"above the {self.unit}s done (or drop it: the schedule then spans --trainer.max_epochs)")
            warnings.warn(
                f"resumed after {self.last_epoch} {self.unit}(s) onto another learning-rate schedule, {built} (the "
                f"checkpoint's: {saved}). Training continues on the new one, from {factor:.4g} x the base learning "
                f"rate; the {self.unit}s already done followed the old one", stacklevel=2)
