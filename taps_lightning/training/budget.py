"""Each task's ``lambda``: a fixed one, or one that lands the task within a storage budget.

With a budget ``F`` the user states "each task may store at most ``F`` of the backbone's
parameters" instead of sweeping ``lambda`` and picking a run afterwards. :class:`BudgetController`
treats ``lambda`` as the dual variable of the constraint ``fraction(task) <= F`` and adjusts it
after every training step (dual ascent), for every task on its own.

Everything a budget decides lives here, in :class:`BudgetPolicy`: the ``lambda`` per task, the
one "within budget" rule (:func:`within_budget`), switching off what is over at an epoch's end
(:func:`enforce_budget`), the score checkpoints are ranked by (``val/budget_acc``), the warning
when no epoch met the budget, and the state a checkpoint keeps. :class:`FixedLambda` answers the
same questions without a budget. Plain Python: the training loop hands in each task's current
fraction and reads back its ``lambda``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from .checks import SettingsError

if TYPE_CHECKING:
    from ..models.taps_model import TapsModel

__all__ = ["BudgetController", "BudgetPolicy", "FixedLambda", "LambdaPolicy", "create_lambda_policy",
           "enforce_budget", "within_budget", "check_budget_reachable", "BUDGET_MONITOR",
           "DEFAULT_BUDGET_RATE", "DEFAULT_BUDGET_BAND"]

#: ``lambda`` added per training step while a task stores twice its budget or more (the error is
#: relative to the budget; tuned on the embedded benchmark: 33 steps an epoch, learning rate 0.01).
DEFAULT_BUDGET_RATE = 0.05
#: Step-size factors when the error changes side (an overshoot) and while it keeps its side.
SHRINK, GROW = 0.5, 1.05
#: Width of the band under the budget in which ``lambda`` is held (fractions, i.e. 0.03 = 3 points).
DEFAULT_BUDGET_BAND = 0.03


#: What checkpoints of a budget run are ranked by (see :meth:`BudgetPolicy.rank_score`).
BUDGET_MONITOR = "val/budget_acc"


def within_budget(fraction: float, budget: float) -> bool:
    """The one "within budget" rule: a task storing ``fraction`` of the backbone meets ``budget``."""
    return fraction <= budget


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


def enforce_budget(model: "TapsModel", task: str, budget: float) -> list[str]:
    """Switch off ``task``'s active layers until it stores at most ``budget`` of the backbone.

    Layers go in order of increasing score (those the task holds on to least), then those
    switched off are switched back on, highest score first, wherever they still fit, so that a
    large layer dropped early does not leave the task far below budget. A layer is switched
    off by its :meth:`~taps_lightning.core.layers.TapsLayer.close_gate`: it stays trainable and can
    come back if its gradient says so. Returns the names switched off (empty when already within
    budget).
    """
    cost = model.task_cost(task)
    base, stored = cost["base_params"], cost["task_params"]

    def fits(params: float) -> bool:
        return within_budget(params / base, budget)

    if fits(stored):
        return []
    layers = dict(model.taps_layers())
    active = [name for name, on in model.gate_states(task).items() if on]
    if not active:  # norms and head alone (a budget at the minimum, up to rounding): nothing to switch off
        return []
    scores = dict(zip(model.layer_order(), model.task_scores(task).detach().float().tolist()))
    ranked = sorted(active, key=lambda n: (scores[n], n))  # lowest score first
    size = {name: layers[name].base_layer.weight.numel() for name in active}
    dropped = []
    for name in ranked:
        if fits(stored):
            break
        stored -= size[name]
        dropped.append(name)
    for name in sorted(dropped, key=lambda n: -scores[n]):  # re-admit what still fits
        if fits(stored + size[name]):
            stored += size[name]
            dropped.remove(name)
    for name in dropped:
        layers[name].close_gate(task)
    return dropped


def check_budget_reachable(budget: float, minimum: Mapping[str, float]) -> None:
    """Refuse a budget below what some task stores with every layer shared: its norms and head
    (``minimum``: ``{task: fraction}``), naming the smallest budget that can be met."""
    below = {task: f for task, f in minimum.items() if not within_budget(f, budget)}
    if below:
        need = max(minimum.values())
        raise SettingsError(
            f"--model.budget {budget} is below what a task stores with no task-specific layer at all (its norms "
            "and head): " + ", ".join(f"{t} {100 * f:.2f} %" for t, f in below.items())
            + f". The smallest budget every task can meet is {need:.4f} ({100 * need:.2f} %); "
            f"use --model.budget {math.ceil(need * 1e4) / 1e4} or more")


class LambdaPolicy:
    """What a training loop asks about ``lambda`` and budgets; :class:`FixedLambda` and
    :class:`BudgetPolicy` answer. ``penalised`` says whether the sparsity penalty applies yet
    (before it does, every task's ``lambda`` is 0)."""

    #: The budget ``F`` (``None``: no budget).
    budget: float | None = None

    def lam(self, task: str) -> float:
        """The ``lambda`` ``task`` trains with once the penalty applies (its latest, with a budget)."""
        raise NotImplementedError

    def step(self, fractions: Mapping[str, float], penalised: bool, new_step: bool) -> dict[str, float]:
        """Each task's ``lambda`` for this batch (``fractions``: the tasks' stored fractions, only
        read with a budget; ``new_step``: the first batch of an optimizer step)."""
        raise NotImplementedError

    def describe(self) -> str:
        """``lam=0.5`` or ``budget=0.2``, for logs and reports."""
        raise NotImplementedError

    def within(self, fractions: Mapping[str, float]) -> dict[str, bool] | None:
        """``{task: within budget}``; ``None`` without a budget."""
        return None

    def enforce(self, model: "TapsModel", tasks: Iterable[str], penalised: bool) -> list[str]:
        """Switch off what is over budget (once the penalty applies); returns what to report."""
        return []

    def rank_score(self, mean_acc: torch.Tensor, fractions: Mapping[str, float], penalised: bool) -> torch.Tensor | None:
        """What checkpoints are ranked by besides ``val/acc`` (``None``: nothing else)."""
        return None

    def missed_message(self, best_score: float | None) -> str | None:
        """A warning when the best ranked checkpoint does not meet the budget."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps (``None``: nothing)."""
        return None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (``None``: it kept nothing)."""


class FixedLambda(LambdaPolicy):
    """The paper's setting: one ``lambda`` for every task (0 before the penalty starts)."""

    def __init__(self, tasks: Iterable[str], lam: float) -> None:
        self.tasks, self.value = list(tasks), lam

    def lam(self, task: str) -> float:
        return float(self.value)

    def step(self, fractions, penalised, new_step):
        lam = self.value if penalised else 0.0
        return {task: lam for task in self.tasks}

    def describe(self) -> str:
        return f"lam={self.value}"


class BudgetPolicy(LambdaPolicy):
    """A storage budget ``F`` per task: ``lambda`` from :class:`BudgetController` (from 0 when
    the penalty starts), :func:`enforce_budget` at each epoch's end, and checkpoints ranked by
    :meth:`rank_score`.

    Args:
        tasks: task names.
        budget: ``F`` in (0, 1].
        rate: the controller's step size.
        minimum: ``{task: fraction}`` each task stores with no task-specific layer (refused when
            over ``budget``: no run could meet it).
    """

    def __init__(self, tasks: Iterable[str], budget: float, rate: float = DEFAULT_BUDGET_RATE,
                 minimum: Mapping[str, float] | None = None) -> None:
        self.tasks = list(tasks)
        check_budget_reachable(budget, minimum or {})
        self.budget = float(budget)
        self.controller = BudgetController(self.tasks, budget, 0.0, rate, minimum=minimum)
        self._misses: dict[float, tuple[float, bool]] = {}  # rank score -> (largest excess, penalty on)

    def lam(self, task: str) -> float:
        return self.controller.lam[task]

    def step(self, fractions, penalised, new_step):
        if not penalised:
            return {task: 0.0 for task in fractions}
        if new_step:
            return self.controller.update(fractions)
        return {task: self.controller.lam[task] for task in fractions}  # the scores have not moved yet

    def describe(self) -> str:
        return f"budget={self.budget}"

    def within(self, fractions):
        return {task: within_budget(f, self.budget) for task, f in fractions.items()}

    def enforce(self, model, tasks, penalised):
        if not penalised:
            return []
        messages = []
        for task in tasks:
            dropped = enforce_budget(model, task, self.budget)
            if dropped:
                messages.append(f"TAPS | budget: {task} was over {100 * self.budget:.4g} %; switched off "
                                f"{len(dropped)} layer(s) with the lowest scores: {', '.join(dropped)}")
        return messages

    def rank_score(self, mean_acc, fractions, penalised):
        """The accuracy once the penalty applies and every task is within budget; else minus the
        largest excess, and minus 1 more before the penalty applies (memory-efficient's joint
        phase stores little, but its gates are not chosen yet), so neither is ever ranked above
        an epoch that met the budget."""
        if all(self.within(fractions).values()) and penalised:
            return mean_acc
        excess = max(max(f - self.budget for f in fractions.values()), 0.0)
        score = torch.tensor(-excess - (0.0 if penalised else 1.0), device=mean_acc.device)
        self._misses[float(score)] = (excess, penalised)  # what a score stands for, for the message below
        return score

    def missed_message(self, best_score):
        if best_score is None or float(best_score) >= 0:
            return None
        excess, penalised = self._misses.get(float(best_score), (None, True))
        where = ("" if excess is None else f" ({100 * excess:.2f} points over"
                 + ("" if penalised else ", from before the sparsity penalty started") + ")")
        return (f"no epoch met --model.budget {self.budget} for every task; the best checkpoint is the nearest "
                f"miss{where}. Train longer (more epochs after the warm-up) or raise --model.budget_rate")

    def state_dict(self):
        return self.controller.state_dict()

    def load_state_dict(self, state):
        if state is not None:  # lambdas, step sizes and steps carry on
            self.controller.load_state_dict(state)


def create_lambda_policy(tasks: Iterable[str], lam: float, budget: float | None = None,
                         rate: float = DEFAULT_BUDGET_RATE,
                         minimum: Callable[[], Mapping[str, float]] | None = None) -> LambdaPolicy:
    """:class:`BudgetPolicy` with a ``budget``, else :class:`FixedLambda` (``minimum`` is only
    computed with a budget)."""
    if budget is None:
        return FixedLambda(tasks, lam)
    return BudgetPolicy(tasks, budget, rate, minimum() if minimum is not None else None)
