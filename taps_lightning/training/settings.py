"""``TapsModule``'s settings as small typed groups, each the one place its own ranges are checked.

A group is a frozen dataclass whose fields are ``--model.*`` flags of the same names (so a
flag can be followed to the group that reads it), built with :meth:`Settings.of` from the
flags; the flags' defaults and documentation are those of the composition root,
:func:`~taps_lightning.training.compose.create_taps_module`, and nowhere else. :meth:`Settings.problems` lists what is wrong with the group, each
problem naming the flag, the value given and what to set instead; :func:`check_settings` asks
every group and refuses them all at once, so a user fixing a config does not discover the
problems one run at a time. Plain Python: usable without Lightning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence, TypeVar

from ..core.config import threshold_problems
from ..models.lora import GROUPED_CONVS
from .checks import SettingsError

__all__ = ["Settings", "OptimizerSettings", "GateSettings", "ModeSettings", "EvaluationSettings",
           "PENALTIES", "SCHEDULERS", "DEFAULT_RECALIBRATE_BATCHES", "check_settings"]

#: ``--model.penalty`` values: the paper's per-layer penalty, and one weighted by layer size.
PENALTIES = ("layers", "params")
#: ``--model.scheduler`` values: cosine stepped per epoch (the paper's), per optimizer step, or none.
SCHEDULERS = ("cosine", "cosine_step", "none")

#: Batches of training images (at the data's batch size) each task's BatchNorm statistics are
#: re-estimated on before validation and test (docs/recalibration.md says how it was chosen).
DEFAULT_RECALIBRATE_BATCHES = 16

_S = TypeVar("_S", bound="Settings")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class Settings:
    """What every group does: build itself from hyper-parameters, list its own problems."""

    @classmethod
    def of(cls: type[_S], flags: Mapping[str, Any]) -> _S:
        """The group's fields picked from the ``--model.*`` flags (other keys ignored; every field
        must be there: the defaults are :func:`~taps_lightning.training.compose.create_taps_module`'s)."""
        missing = [f.name for f in fields(cls) if f.name not in flags]
        if missing:
            raise TypeError(f"{cls.__name__}.of: no value for {missing} (take the defaults from "
                            "taps_lightning.training.compose.flag_defaults())")
        return cls(**{f.name: flags[f.name] for f in fields(cls)})

    def problems(self, learns_gates: bool) -> list[str]:
        """One line per out-of-range field (``learns_gates``: whether the mode has TAPS gates,
        which is when the gate settings matter)."""
        raise NotImplementedError


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """SGD with momentum (the paper's optimiser) and its learning-rate schedule.

    Fields: the flags of the same names (:func:`~taps_lightning.training.compose.create_taps_module`).
    """

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    score_lr: float | None
    scheduler: str
    cosine_epochs: int | None

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

    Fields: the flags of the same names (:func:`~taps_lightning.training.compose.create_taps_module`).
    """

    backbone: str
    threshold: float
    score_init: float
    recompute_weight: bool
    sparsity_warmup_epochs: int
    joint_epochs: int
    adapter_rank: int
    num_stages: int
    adapter_schedule: Sequence[int] | None
    similarity_epochs: int
    similarity_batches: int
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_grouped_convs: str

    def problems(self, learns_gates: bool) -> list[str]:
        found = []
        for name, least in (("sparsity_warmup_epochs", 0), ("joint_epochs", 0)):
            if not _count(getattr(self, name), least):
                found.append(f"--model.{name} must be an integer >= {least}, got {getattr(self, name)}")
        for name in ("adapter_rank", "num_stages", "similarity_epochs", "similarity_batches", "lora_rank"):
            if not _count(getattr(self, name), 1):
                found.append(f"--model.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lora_alpha is None or (_finite(self.lora_alpha) and self.lora_alpha > 0)):
            found.append(f"--model.lora_alpha must be a finite number > 0 (or null for --model.lora_rank: a scale of "
                         f"alpha / rank = 1), got {self.lora_alpha}")
        if not (_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            found.append(f"--model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_grouped_convs not in GROUPED_CONVS:
            found.append(f"--model.lora_grouped_convs must be one of {', '.join(GROUPED_CONVS)} (what the LoRA "
                         f"baseline does with the grouped convolutions PEFT cannot adapt), got {self.lora_grouped_convs!r}")
        if not learns_gates:  # a baseline has no gates: tau and the initial score mean nothing
            return found
        found += threshold_problems(self.threshold, self.score_init)  # the core's own rule (TapsConfig)
        if _finite(self.score_init) and _finite(self.threshold) and self.score_init < self.threshold:
            found.append(
                f"--model.score_init {self.score_init} < --model.threshold {self.threshold}: every layer starts off "
                "with a zero delta, so its score gradient <dL/dw, delta> is 0 and no layer can ever switch on; the "
                "run would be a linear probe. Use score_init >= threshold (paper: 0.15 and 0.1), or --model.mode linear")
        return found


@dataclass(frozen=True)
class GateSettings(Settings):
    """What drives the gates: the sparsity penalty, its ``lambda`` or a storage budget, and when
    the gates stop moving.

    Fields: the flags of the same names (:func:`~taps_lightning.training.compose.create_taps_module`).
    """

    lam: float
    penalty: str | None
    penalty_divisor: float | None
    budget: float | None
    budget_rate: float
    freeze_gates_epochs: int

    def __post_init__(self) -> None:
        # no penalty given: ``params`` with a budget (the Lagrangian of "stored fraction <= budget" is
        # exactly that sum), the paper's ``layers`` without
        if self.penalty is None:
            object.__setattr__(self, "penalty", "params" if self.budget is not None else "layers")

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

    Fields: the flags of the same names (:func:`~taps_lightning.training.compose.create_taps_module`).
    """

    recalibrate_batches: int

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
