"""Storage budgets: a per-task ``lambda`` that lands each task at a target size.

With a budget ``F`` the user states "each task may store at most ``F`` of the backbone's
parameters" instead of sweeping ``lambda`` and picking a run afterwards. :class:`BudgetController`
treats ``lambda`` as the dual variable of the constraint ``fraction(task) <= F`` and adjusts it
after every training step (dual ascent), for every task on its own. Plain Python: the training
loop hands in each task's current fraction and reads back its ``lambda``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

if TYPE_CHECKING:
    from .model import TapsModel

__all__ = ["BudgetController", "enforce_budget", "DEFAULT_BUDGET_RATE", "DEFAULT_BUDGET_BAND"]

#: ``lambda`` added per training step while a task stores twice its budget or more (the error is
#: relative to the budget; tuned on the embedded benchmark: 33 steps an epoch, learning rate 0.01).
DEFAULT_BUDGET_RATE = 0.05
#: Step-size factors when the error changes side (an overshoot) and while it keeps its side.
SHRINK, GROW = 0.5, 1.05
#: Width of the band under the budget in which ``lambda`` is held (fractions, i.e. 0.03 = 3 points).
DEFAULT_BUDGET_BAND = 0.03


class BudgetController:
    """Dual ascent on ``fraction(task) <= budget``, one ``lambda`` per task.

    After each step, with ``f`` the task's stored fraction under its current gates:

    - ``f > budget``: ``lambda += rate * e`` with ``e = min(1, (f - budget) / budget)``
      (over budget: press harder);
    - ``budget - band <= f <= budget``: ``lambda`` is held (within budget and not far below);
    - ``f < budget - band``: ``lambda += rate * e`` with ``e = max(-1, (f - (budget - band)) / band)``
      (too far below: ease off quickly, never under 0, so layers that pay their way can switch
      back on; a layer once off rarely returns, its delta frozen, so waste is undone early).

    Over budget the error is relative to the budget, so a 10 % budget overshot by 10 points is
    pressed as hard as a 40 % budget overshot by 40, and saturates at 1, so the first steps after
    the warm-up (every layer on) do not wind ``lambda`` up before the gates can respond. The band
    lets ``lambda`` settle instead of chasing every flicker of a gate near the threshold, and the
    step size halves each time the error changes side (an overshoot) and grows back by 5 % a
    step, up to ``rate``, while it keeps its side. The gates still flicker, so a run is held to
    its ceiling by :func:`enforce_budget` at the end of every epoch, not by the controller alone.

    Args:
        tasks: task names.
        budget: ``F`` in (0, 1], a fraction of the backbone's parameters.
        lam_init: every task's ``lambda`` when the penalty starts (``TapsModule`` starts at 0).
        rate: step size of the dual ascent.
        band: width of the hold band under ``budget``.
        minimum: ``{task: fraction}`` a task stores with every layer shared (its norms and head);
            a task there is never pressed (its error counts as far below), even when the band
            reaches under it.
    """

    def __init__(self, tasks: Iterable[str], budget: float, lam_init: float,
                 rate: float = DEFAULT_BUDGET_RATE, band: float = DEFAULT_BUDGET_BAND,
                 minimum: Mapping[str, float] | None = None) -> None:
        if not 0 < budget <= 1 or not rate > 0 or not 0 < band < 1 or not lam_init >= 0:
            raise ValueError(f"BudgetController needs 0 < budget <= 1, rate > 0, 0 < band < 1 and lam_init >= 0; "
                             f"got budget={budget}, rate={rate}, band={band}, lam_init={lam_init}")
        self.budget, self.rate, self.band = float(budget), float(rate), float(band)
        #: what each task stores with no task-specific layer (norms and head): at it, lambda only eases
        self.minimum = dict(minimum or {})
        self.lam = {task: float(lam_init) for task in tasks}
        self.step_size = {task: self.rate for task in self.lam}  # shrinks when the error changes side
        self.side = {task: 0 for task in self.lam}  # side of the last error outside the band: +1 over, -1 under
        self.steps = 0  # updates made (all tasks count as one step)

    def meets(self, fraction: float) -> bool:
        """Whether a task storing ``fraction`` of the backbone is within the budget."""
        return fraction <= self.budget

    def update(self, fractions: Mapping[str, float]) -> dict[str, float]:
        """One dual-ascent step from each task's current fraction; returns the new ``lambda``s."""
        for task, fraction in fractions.items():
            floor = self.budget - self.band
            error = fraction - self.budget if fraction > self.budget else min(0.0, fraction - floor)
            relative = max(-1.0, min(1.0, error / (self.budget if error > 0 else self.band)))
            if fraction <= self.minimum.get(task, -1.0) and fraction <= self.budget:
                relative = -1.0  # nothing left to switch off: ease off at full step
            side = (relative > 0) - (relative < 0)
            if side:
                if side == -self.side[task]:  # crossed the band: damp the oscillation between two gate sets
                    self.step_size[task] *= SHRINK
                elif side == self.side[task]:  # still on the same side: recover speed, up to ``rate``
                    self.step_size[task] = min(self.rate, self.step_size[task] * GROW)
                self.side[task] = side
            self.lam[task] = max(0.0, self.lam[task] + self.step_size[task] * relative)
        self.steps += 1
        return dict(self.lam)

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints (a checkpoint loads them with ``weights_only=True``)."""
        return {"budget": self.budget, "rate": self.rate, "band": self.band, "lam": dict(self.lam),
                "step_size": dict(self.step_size), "side": dict(self.side), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the tasks must be the same (the settings may change, as any
        hyper-parameter may on resume)."""
        if set(state["lam"]) != set(self.lam):
            raise ValueError(f"budget controller state has tasks {sorted(state['lam'])}, this run {sorted(self.lam)}")
        self.lam = {task: float(state["lam"][task]) for task in self.lam}
        self.step_size = {task: min(self.rate, float(state["step_size"][task])) for task in self.lam}
        self.side = {task: int(state["side"][task]) for task in self.lam}
        self.steps = int(state["steps"])


def enforce_budget(model: "TapsModel", task: str, budget: float, margin: float = 1e-3) -> list[str]:
    """Switch off ``task``'s active layers until it stores at most ``budget`` of the backbone.

    Layers go in order of increasing score (those the task holds on to least), then those
    switched off are switched back on, highest score first, wherever they still fit, so that a
    large layer dropped early does not leave the task far below budget. A layer is switched
    off by setting its score to ``threshold - margin``: it stays trainable and can come back if
    its gradient says so. Returns the names switched off (empty when already within budget).
    """
    cost = model.task_cost(task)
    allowed = budget * cost["base_params"] - cost["norm_params"] - cost["head_params"]  # for deltas
    stored = cost["delta_params"]
    if stored <= allowed:
        return []
    layers = dict(model.taps_layers())
    active = [name for name, on in model.gate_states(task).items() if on]
    if not active:  # norms and head alone (a budget at the minimum, up to rounding): nothing to switch off
        return []
    scores = dict(zip(active, torch.stack([layers[n].taps_score[task].detach().float() for n in active]).tolist()))
    ranked = sorted(active, key=lambda n: (scores[n], n))  # lowest score first
    size = {name: layers[name].base_layer.weight.numel() for name in active}
    dropped = []
    for name in ranked:
        if stored <= allowed:
            break
        stored -= size[name]
        dropped.append(name)
    for name in sorted(dropped, key=lambda n: -scores[n]):  # re-admit what still fits
        if stored + size[name] <= allowed:
            stored += size[name]
            dropped.remove(name)
    with torch.no_grad():
        for name in dropped:
            layers[name].taps_score[task].fill_(model.threshold - margin)
    return dropped
