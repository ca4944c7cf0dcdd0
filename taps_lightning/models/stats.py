"""What a task costs: its sparsity penalty, which layers it adapts and how many weights it adds.

Functional forms of :class:`~taps_lightning.TapsModel`'s methods (and, for the counts, of any
:class:`~taps_lightning.models.multitask.MultiTaskModel`), for use in custom training loops.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .taps_model import TapsModel
from .multitask import MultiTaskModel

__all__ = ["sparsity_loss", "gate_states", "count_params", "total_params_multiple", "GateFlipCounter"]


def sparsity_loss(model: TapsModel, task: str, divisor: float | None = None) -> Tensor:
    """``(1/L) * sum_i |s_i|`` over ``task``'s scores, ``L`` = number of gated layers.

    Multiply by ``lambda`` for the paper's penalty (Eq. 3). Differentiable in the scores.
    ``divisor`` replaces ``L`` (the authors' script divides by 52 whatever the backbone).
    """
    return model.regularizer(task, divisor)


def gate_states(model: TapsModel, task: str) -> "OrderedDict[str, bool]":
    """``{layer_name: is task-specific}`` in forward order, decided as the forward decides
    (:func:`~taps_lightning.core.gate.gate_open`, one device sync for all layers)."""
    return model.gate_states(task)


def count_params(model: MultiTaskModel, task: str) -> dict[str, float]:
    """Parameter cost of ``task``.

    Returns a dict with ``active_layers`` / ``gated_layers`` (layers with a task-specific
    weight / layers that could have one), ``delta_params`` (weights of the active layers),
    ``norm_params`` and ``head_params`` (always task-specific), ``task_params`` (their sum:
    what the task stores besides the shared base), ``base_params`` (the shared backbone
    without a classifier) and ``fraction`` = ``task_params / base_params``.
    Scores (one scalar per layer) and norm running statistics are buffers of negligible
    size and are not counted, as in the paper.
    """
    model._check_task(task)
    return model.task_cost(task)


def total_params_multiple(model: MultiTaskModel) -> float:
    """Base plus every task's task-specific parameters, in units of one backbone (the
    paper's "Params" column, e.g. ``4.12x``); an adapter shared by several tasks counts once."""
    return model.total_params_multiple()


class GateFlipCounter:
    """Counts each task's gate changes between steps (``taps/<task>/gate_flips``), on the device:
    no host sync per step. :meth:`start` at an epoch's start, :meth:`step` after each step,
    :attr:`flips` at its end."""

    def __init__(self) -> None:
        self.before: dict[str, Tensor] = {}
        self.flips: dict[str, Tensor] = {}

    def start(self, model: MultiTaskModel, tasks) -> None:
        gates = {t: model.gate_tensor(t) for t in tasks}
        self.before = {t: g for t, g in gates.items() if g is not None}
        self.flips = {t: torch.zeros((), dtype=torch.long, device=g.device) for t, g in self.before.items()}

    def step(self, model: MultiTaskModel) -> None:
        for task, before in self.before.items():
            now = model.gate_tensor(task)
            self.flips[task] += (now != before).sum()
            self.before[task] = now
