"""Task-specific normalisation: one copy of a norm layer per task (as PEFT's ``ln_tuning``).

The paper trains BatchNorm per task in every variant; LayerNorm/GroupNorm get the same
treatment so that transformers and ConvNeXt are handled alike. The pre-trained norm is kept
as ``base_norm``: it is the initial value of every new task's copy and what runs when no
task is active.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .task_layer import TaskLayer

__all__ = ["TaskNorm", "NORM_TYPES", "task_batchnorms_of"]

#: Norm types that get a copy per task (subclasses such as timm's ``BatchNormAct2d`` and
#: ``LayerNorm2d`` included).
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class TaskNorm(TaskLayer, nn.Module):
    """Holds ``base_norm`` (frozen template) and ``norms[task]`` (trained copies)."""

    adapter_layer_names = ("norms",)
    other_param_names = ("base_norm",)  # the pre-trained template each new task copies

    def __init__(self, base_norm: nn.Module) -> None:
        super().__init__()
        self.base_norm = base_norm
        self.norms = nn.ModuleDict()
        self.active_task: str | None = None
        base_norm.requires_grad_(False)

    @property
    def tasks(self) -> list[str]:
        return list(self.norms.keys())

    def add_task(self, task: str) -> None:
        norm = copy.deepcopy(self.base_norm)
        norm.requires_grad_(True)
        norm.train(self.training)
        self.norms[task] = norm

    def _drop_task(self, task: str) -> None:
        del self.norms[task]

    def task_norm(self, task: str) -> nn.Module:
        """``task``'s own copy of the norm."""
        return self.norms[task]

    def task_parameters(self, task: str):
        yield from self.norms[task].parameters()

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        return {f"norm.{k}": v.detach() for k, v in self.norms[task].state_dict().items()}

    def merged_layer(self, task: str) -> nn.Module:
        return copy.deepcopy(self.norms[task])

    def state_shapes(self) -> dict[str, torch.Size]:
        return {f"norm.{k}": v.shape for k, v in self.base_norm.state_dict().items()}

    def task_state(self, task: str) -> dict[str, Tensor]:
        return self.task_tensors(task)

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        self._check_state(state)
        self.norms[task].load_state_dict({k[len("norm."):]: v for k, v in state.items()})

    def forward(self, x: Tensor) -> Tensor:
        if self.active_task is None:
            return self.base_norm(x)
        return self.norms[self.active_task](x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_norm", "norms"):
                raise
            modules = self._modules
            norm = modules["norms"][self.active_task] if self.active_task is not None else modules["base_norm"]
            return getattr(norm, name)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, active_task={self.active_task}"


def task_batchnorms_of(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The BatchNorms that keep running statistics among ``modules`` and their children."""
    return [m for module in modules for m in module.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
