"""``TaskLayer``: the one set of verbs every per-task layer speaks (as PEFT's ``BaseTunerLayer``).

TAPS layers, task norms and LoRA adapters all hold something per task around a shared layer.
Models switch, add, remove and merge tasks through these verbs only, never through the
layer's own attribute names, so a new kind of per-task layer is one class.
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

__all__ = ["TaskLayer"]


class TaskLayer:
    """Mixin of every per-task layer (used with :class:`torch.nn.Module`).

    Subclasses implement :attr:`tasks`, :meth:`add_task`, :meth:`_drop_task`,
    :meth:`task_parameters`, :meth:`task_tensors` and :meth:`merged_layer`.
    """

    active_task: str | None = None

    @property
    def tasks(self) -> list[str]:
        raise NotImplementedError

    def add_task(self, task: str) -> None:
        """Create ``task``'s own state (deltas, a norm copy, an adapter route, ...)."""
        raise NotImplementedError

    def _drop_task(self, task: str) -> None:
        raise NotImplementedError

    def remove_task(self, task: str) -> None:
        """Delete ``task``'s own state; the layer stops running it."""
        self._drop_task(task)
        if self.active_task == task:
            self.active_task = None

    def set_task(self, task: str | None) -> None:
        """Run ``task`` from now on (``None``: the shared layer alone)."""
        self.active_task = task

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters ``task`` owns or uses here (what it trains)."""
        raise NotImplementedError

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        """What ``task`` adds here, detached: ``{"delta": ...}`` for weight adapters (nothing
        for a closed TAPS gate), ``{"norm.<key>": ...}`` for norms."""
        raise NotImplementedError

    def merged_layer(self, task: str) -> nn.Module:
        """A plain copy of the shared layer with ``task`` folded in (no per-task code left)."""
        raise NotImplementedError
