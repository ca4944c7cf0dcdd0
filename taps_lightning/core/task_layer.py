"""``TaskLayer``: the one set of verbs every per-task layer speaks (as PEFT's ``BaseTunerLayer``).

TAPS layers, task norms and LoRA adapters all hold something per task around a shared layer.
Models switch, add, remove and merge tasks through these verbs only, never through the
layer's own attribute names, so a new kind of per-task layer is one class.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["TaskLayer"]


class TaskLayer:
    """Mixin of every per-task layer (used with :class:`torch.nn.Module`).

    Subclasses declare :attr:`adapter_layer_names` and implement :attr:`tasks`,
    :meth:`add_task`, :meth:`_drop_task`, :meth:`task_parameters`, :meth:`task_tensors`,
    :meth:`merged_layer` and the task-file verbs :meth:`state_shapes`, :meth:`task_state` and
    :meth:`load_task_state`. Nothing outside the layer indexes the attributes it declares.
    """

    #: The attributes holding per-task state (as PEFT's ``adapter_layer_names``): only the layer reads
    #: them, and what they hold is never shared (:meth:`MultiTaskModel.shared_parameters`).
    adapter_layer_names: tuple[str, ...] = ()
    #: Other attributes that are not the shared layer (as PEFT's ``other_param_names``), e.g. the
    #: pre-trained norm every new task copies.
    other_param_names: tuple[str, ...] = ()

    def own_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter this layer holds besides the shared layer's (all tasks', and templates)."""
        for name in (*self.adapter_layer_names, *self.other_param_names):
            yield from getattr(self, name).parameters()
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

    # -- what a task file holds of this layer (the file's layout is the export module's) ----
    def state_shapes(self) -> dict[str, torch.Size]:
        """Every entry :meth:`task_state` may return, with its shape (for checking a file)."""
        raise NotImplementedError

    def task_state(self, task: str) -> dict[str, Tensor]:
        """``task``'s tensors to store, detached, by local name (``score``, ``delta``,
        ``norm.<key>``, ``lora_A``, ...)."""
        raise NotImplementedError

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (as :meth:`task_state` returns it; optional entries may be absent)
        into ``task``'s tensors."""
        raise NotImplementedError

    def _check_state(self, state: dict[str, Tensor]) -> None:
        """Refuse entries this layer does not hold or of another shape, by name (``copy_`` would
        broadcast a wrong shape silently)."""
        shapes = self.state_shapes()
        wrong = [f"{k}: not an entry of this layer (it holds {sorted(shapes)})" if k not in shapes else
                 f"{k}: shape {tuple(v.shape)}, expected {tuple(shapes[k])}"
                 for k, v in state.items() if k not in shapes or v.shape != shapes[k]]
        if wrong:
            raise ValueError(f"{type(self).__name__}.load_task_state: {'; '.join(wrong)}")
