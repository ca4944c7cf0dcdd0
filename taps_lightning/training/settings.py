"""``TapsModule``'s settings as small typed groups, each the one place its own ranges are checked.

A group is a frozen dataclass whose fields are ``TapsModule`` arguments of the same names (so a
flag can be followed to the group that reads it), built with :meth:`Settings.of` from the
module's hyper-parameters. :meth:`Settings.problems` lists what is wrong with the group, each
problem naming the flag, the value given and what to set instead; :func:`check_settings` asks
every group and refuses them all at once, so a user fixing a config does not discover the
problems one run at a time. Plain Python: usable without Lightning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence, TypeVar

from .budget import DEFAULT_BUDGET_RATE
from .checks import SettingsError
from ..core.config import SCORE_INIT, THRESHOLD

__all__ = ["Settings", "OptimizerSettings", "GateSettings", "ModeSettings", "EvaluationSettings",
           "PENALTIES", "SCHEDULERS", "DEFAULT_RECALIBRATE_BATCHES", "check_settings"]

#: ``--model.penalty`` values: the paper's per-layer penalty, and one weighted by layer size.
PENALTIES = ("layers", "params")
#: ``--model.scheduler`` values: cosine stepped per epoch (the paper's), per optimizer step, or none.
SCHEDULERS = ("cosine", "cosine_step", "none")

#: Batches of training images (at the data's batch size) each task's BatchNorm statistics are
#: re-estimated on before validation and test (see the README's *Results* for how it was chosen).
DEFAULT_RECALIBRATE_BATCHES = 16

_S = TypeVar("_S", bound="Settings")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class Settings:
    """What every group does: build itself from hyper-parameters, list its own problems."""

    @classmethod
    def of(cls: type[_S], hparams: Mapping[str, Any]) -> _S:
        """The group's fields picked from a module's hyper-parameters (other keys ignored)."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls) if f.name in hparams})

    def problems(self, learns_gates: bool) -> list[str]:
        """One line per out-of-range field (``learns_gates``: whether the mode has TAPS gates,
        which is when the gate settings matter)."""
        raise NotImplementedError


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """SGD with momentum (the paper's optimiser) and its learning-rate schedule.

    Args:
        lr: learning rate.
        momentum: SGD momentum, in ``[0, 1)``.
        nesterov: Nesterov momentum (the authors' script builds plain-momentum SGD).
        weight_decay: on every trained weight but the scores.
        score_lr: the scores' learning rate (``None``: ``lr``).
        scheduler: one of :data:`SCHEDULERS`.
        cosine_epochs: length of the per-epoch cosine (``None``: ``trainer.max_epochs``).
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    score_lr: float | None = None
    scheduler: str = "cosine"
    cosine_epochs: int | None = None

    @property
    def scores_lr(self) -> float:
        """The learning rate the scores train at."""
        return self.score_lr or self.lr

    @property
    def sgd_nesterov(self) -> bool:
        """``nesterov`` as SGD takes it: torch refuses Nesterov without momentum, so ``momentum 0``
        turns it off."""
        return self.nesterov and self.momentum > 0

    def problems(self, learns_gates: bool) -> list[str]:
        found = []
        if not (_finite(self.lr) and self.lr > 0):
            found.append(f"--model.lr must be a finite number > 0, got {self.lr}")
        if not (self.score_lr is None or (_finite(self.score_lr) and self.score_lr > 0)):
            found.append(f"--model.score_lr must be a finite number > 0 (or null for --model.lr), got {self.score_lr}")
        if not (_finite(self.momentum) and 0 <= self.momentum < 1):
            found.append(f"--model.momentum must be in [0, 1), got {self.momentum}")
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            found.append(f"--model.weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            found.append(f"--model.scheduler must be one of cosine (per epoch), cosine_step (per optimizer step), "
                         f"none, got {self.scheduler!r}")
        if not (self.cosine_epochs is None or _count(self.cosine_epochs, 1)):
            found.append(f"--model.cosine_epochs must be an integer >= 1 (or null for --trainer.max_epochs), "
                         f"got {self.cosine_epochs}")
        return found


@dataclass(frozen=True)
class ModeSettings(Settings):
    """What a mode reads to build its model and run its phases.

    Args:
        backbone: the backbone's name, recorded in task files.
        threshold, score_init, recompute_weight: the TAPS layers' :class:`~taps_lightning.core.config.TapsConfig`.
        sparsity_warmup_epochs: epochs of gate training before the penalty starts.
        joint_epochs: memory-efficient mode: length of the joint phase.
        adapter_rank, num_stages, adapter_schedule: progressive mode: the adapters.
        similarity_epochs, similarity_batches: progressive mode: the warm-up and the batches
            whose gradients group the tasks.
    """

    backbone: str = "resnet50"
    threshold: float = THRESHOLD
    score_init: float = SCORE_INIT
    recompute_weight: bool = True
    sparsity_warmup_epochs: int = 3
    joint_epochs: int = 1
    adapter_rank: int = 8
    num_stages: int = 4
    adapter_schedule: Sequence[int] | None = None
    similarity_epochs: int = 1
    similarity_batches: int = 8

    def problems(self, learns_gates: bool) -> list[str]:
        found = []
        for name, least in (("sparsity_warmup_epochs", 0), ("joint_epochs", 0)):
            if not _count(getattr(self, name), least):
                found.append(f"--model.{name} must be an integer >= {least}, got {getattr(self, name)}")
        for name in ("adapter_rank", "num_stages", "similarity_batches"):
            if not _count(getattr(self, name), 1):
                found.append(f"--model.{name} must be >= 1, got {getattr(self, name)}")
        if not learns_gates:  # a baseline has no gates: tau and the initial score mean nothing
            return found
        if not (_finite(self.threshold) and self.threshold > 0):
            found.append(f"--model.threshold (tau) must be a finite number > 0 (the penalty drives scores to 0, so a "
                         f"layer can only switch off below a positive tau; paper: 0.1), got {self.threshold}")
        if not _finite(self.score_init):
            found.append(f"--model.score_init must be a finite number, got {self.score_init}")
        elif _finite(self.threshold) and self.score_init < self.threshold:
            found.append(
                f"--model.score_init {self.score_init} < --model.threshold {self.threshold}: every layer starts off "
                "with a zero delta, so its score gradient <dL/dw, delta> is 0 and no layer can ever switch on; the "
                "run would be a linear probe. Use score_init >= threshold (paper: 0.15 and 0.1), or --model.mode linear")
        return found


@dataclass(frozen=True)
class GateSettings(Settings):
    """What drives the gates: the sparsity penalty, its ``lambda`` or a storage budget, and when
    the gates stop moving.

    Args:
        lam: ``lambda``, the penalty's weight (not used with a ``budget``).
        penalty: one of :data:`PENALTIES`, resolved (``TapsModule`` picks ``params`` with a budget).
        penalty_divisor: the ``layers`` penalty's divisor instead of ``L``.
        budget: the fraction of the backbone each task may store, in ``(0, 1]``.
        budget_rate: the budget's dual-ascent step.
        freeze_gates_epochs: the last epochs in which the scores get no update.
    """

    lam: float = 0.5
    penalty: str = "layers"
    penalty_divisor: float | None = None
    budget: float | None = None
    budget_rate: float = DEFAULT_BUDGET_RATE
    freeze_gates_epochs: int = 0

    def problems(self, learns_gates: bool) -> list[str]:
        found = []
        if not (self.penalty_divisor is None or (_finite(self.penalty_divisor) and self.penalty_divisor > 0)):
            found.append(f"--model.penalty_divisor must be > 0 (or null for L, the number of gated layers), "
                         f"got {self.penalty_divisor}")
        if not _count(self.freeze_gates_epochs, 0):
            found.append(f"--model.freeze_gates_epochs must be an integer >= 0, got {self.freeze_gates_epochs}")
        if self.penalty not in PENALTIES:
            found.append(f"--model.penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.penalty_divisor is not None and self.penalty == "params":
            found.append("--model.penalty_divisor replaces L in the 'layers' penalty; --model.penalty params (the "
                         "default with --model.budget) weights each layer by its share of the gated parameters and "
                         "takes no divisor (drop the divisor, or pass --model.penalty layers)")
        if not (self.budget is None or (_finite(self.budget) and 0 < self.budget <= 1)):
            found.append(f"--model.budget is the fraction of the backbone each task may store, in (0, 1] "
                         f"(0.2 = 20 %), got {self.budget}")
        if not (_finite(self.budget_rate) and self.budget_rate > 0):
            found.append(f"--model.budget_rate must be a finite number > 0, got {self.budget_rate}")
        if self.budget is not None and not learns_gates:
            found.append("--model.budget needs a mode that learns TAPS gates (incremental, joint, memory_efficient); "
                         "the other modes store a fixed size per task")
        if learns_gates and not (_finite(self.lam) and self.lam >= 0):
            found.append(f"--model.lam must be a finite number >= 0 (a negative lambda rewards large scores), "
                         f"got {self.lam}")
        return found


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    """What happens before the weights are evaluated.

    Args:
        recalibrate_batches: batches each task's BatchNorm statistics are re-estimated on
            (0: keep the training-time running averages).
    """

    recalibrate_batches: int = DEFAULT_RECALIBRATE_BATCHES

    def problems(self, learns_gates: bool) -> list[str]:
        if _count(self.recalibrate_batches, 0):
            return []
        return [f"--model.recalibrate_batches must be an integer >= 0 (0: keep the training-time statistics), "
                f"got {self.recalibrate_batches}"]


def check_settings(*groups: Settings, learns_gates: bool) -> None:
    """Raise :class:`~taps_lightning.training.checks.SettingsError` listing every group's problems, one per line."""
    problems = [p for group in groups for p in group.problems(learns_gates)]
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))
