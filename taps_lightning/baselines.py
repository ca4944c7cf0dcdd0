"""The paper's reference points, with the same task interface as ``TapsModel``.

* fine-tuning (the paragon): a full copy of the backbone per task;
* feature extractor (the baseline): one frozen backbone, a trained head per task;
* joint fine-tuning (paper Table 5): one backbone trained by all tasks, a head per task.
"""
from __future__ import annotations

import copy
from typing import Mapping

from torch import Tensor, nn

from .inject import strip_classifier

__all__ = ["MultiHeadModel"]


class MultiHeadModel(nn.Module):
    """A backbone (shared or copied per task) with one linear head per task.

    Args:
        backbone: timm/torchvision classifier or feature extractor (classifier removed).
        tasks: ``{task: num_classes}``.
        copy_per_task: one backbone copy per task (fine-tuning) or one shared backbone.
        train_backbone: train the backbone(s); ``False`` freezes them in eval mode (feature extractor).
    """

    def __init__(self, backbone: nn.Module, tasks: Mapping[str, int], copy_per_task: bool,
                 train_backbone: bool, backbone_name: str | None = None) -> None:
        super().__init__()
        self.head_path, self.num_features = strip_classifier(backbone)[:2]
        self.backbone_name = backbone_name or type(backbone).__name__
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        self.copy_per_task = copy_per_task
        self.train_backbone = train_backbone
        if copy_per_task:
            self.backbones = nn.ModuleDict({t: copy.deepcopy(backbone) for t in tasks})
        else:
            self.backbone = backbone
        self.heads = nn.ModuleDict({t: nn.Linear(self.num_features, int(n)) for t, n in tasks.items()})
        for net in self._backbones():
            net.requires_grad_(train_backbone)
        self.active_task = next(iter(tasks)) if tasks else None
        self.train()  # a frozen backbone starts (and, as Lightning preserves modes, stays) in eval mode

    def _backbones(self) -> list[nn.Module]:
        return list(self.backbones.values()) if self.copy_per_task else [self.backbone]

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def set_task(self, task: str) -> None:
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has tasks {self.tasks}")
        self.active_task = task

    def train(self, mode: bool = True) -> "MultiHeadModel":
        super().train(mode)
        if not self.train_backbone:  # a fixed feature extractor keeps its BatchNorm statistics
            for net in self._backbones():
                net.eval()
        return self

    def forward(self, x: Tensor, task: str | None = None) -> Tensor:
        task = task or self.active_task
        net = self.backbones[task] if self.copy_per_task else self.backbone
        return self.heads[task](net(x))

    def task_param_count(self, task: str) -> int:
        """What ``task`` stores beyond the shared base: its backbone copy (fine-tuning) and its head."""
        head = sum(p.numel() for p in self.heads[task].parameters())
        return head + (self.base_param_count if self.copy_per_task else 0)
