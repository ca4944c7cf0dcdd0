"""Training modes as strategy objects: what differs between TAPS variants and baselines.

``TapsModule`` owns the loss, the metrics and the optimiser and asks its mode everything else:
which model to build, whether the sparsity penalty applies, what happens at an epoch's start
and end (memory-efficient phases, progressive grouping), and which parameters the optimiser
holds. Adding a mode is one subclass and one entry in :data:`MODES`. Plain PyTorch: the
module hands in the epoch and, for DDP, a ``reduce`` function.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..models.baselines import MultiHeadModel
from ..core.config import TapsConfig
from ..models.taps_model import TapsModel
from ..models.multitask import MultiTaskModel, task_cost_of
from ..models.progressive import ProgressiveAdapterModel, cosine_similarity_matrix, group_tasks
from .checks import SettingsError
from .settings import ModeSettings

__all__ = ["Mode", "ModeSettings", "MODES", "TAPS_MODES", "create_mode", "mode_class"]


class Mode:
    """Defaults: a model whose parameters train as built, no penalty, no phases."""

    #: Whether the mode learns TAPS gates (the sparsity penalty and per-layer costs apply).
    learns_gates = False
    #: Whether some trained parameters sit out of the graph in some epochs (DDP must be told).
    leaves_parameters_unused = False

    def __init__(self, settings: ModeSettings) -> None:
        self.settings = settings
        #: Progressive grouping: each stage's task-gradient cosine similarities, and the epoch it was made.
        self.similarity: dict[int, Tensor] = {}
        self.grouping_epoch: int | None = None

    def build(self, net: nn.Module, tasks: Mapping[str, int]) -> MultiTaskModel:
        raise NotImplementedError

    def taps_start_epoch(self) -> int:
        """First epoch in which gates train."""
        return 0

    def penalty_active(self, epoch: int) -> bool:
        """Whether the sparsity penalty applies at ``epoch``: in modes with gates, once the
        sparsity warm-up is over."""
        return self.learns_gates and epoch >= self.taps_start_epoch() + self.settings.sparsity_warmup_epochs

    def enter_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        """Called at setup and at every training epoch's start."""

    def task_cost(self, model: MultiTaskModel, task: str, epoch: int) -> dict[str, float]:
        return model.task_cost(task)

    def optimizer_parameters(self, model: MultiTaskModel) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def schedule_boundary(self, total: int, epochs: int | None, per_epoch: bool) -> int:
        """Where a second cosine cycle starts (0: one cycle)."""
        return 0

    # progressive grouping; no-ops elsewhere
    def collects_gradients(self, model: MultiTaskModel, epoch: int, batch_idx: int) -> bool:
        return False

    def collect(self, model: MultiTaskModel, losses: dict[str, Tensor]) -> None:
        pass

    def end_epoch(self, model: MultiTaskModel, epoch: int, reduce: Callable[[Tensor], Tensor]) -> str | None:
        """Called at every training epoch's end; returns a message to print, if any."""
        return None


class Incremental(Mode):
    """Eq. 3: frozen base, each task learns its deltas, gates, norms and head on its own."""

    learns_gates = True
    freeze_base = True

    def build(self, net, tasks):
        s = self.settings
        config = TapsConfig(s.threshold, s.score_init, s.recompute_weight)
        return TapsModel(net, tasks=tasks, config=config, freeze_base=self.freeze_base, backbone_name=s.backbone)


class Joint(Incremental):
    """Eq. 4: the base is trained with all tasks."""

    freeze_base = False


class MemoryEfficient(Incremental):
    """Sec. 3.3: ``joint_epochs`` of joint training of base, norms and heads (gates off), then
    incremental TAPS on that base, with its own cosine cycle."""

    leaves_parameters_unused = True  # the deltas during the joint phase

    def taps_start_epoch(self) -> int:
        return self.settings.joint_epochs

    def enter_epoch(self, model: TapsModel, epoch: int) -> None:
        joint_phase = epoch < self.taps_start_epoch()
        model.set_taps_enabled(not joint_phase)
        model.set_base_trainable(joint_phase)

    def task_cost(self, model: TapsModel, task: str, epoch: int) -> dict[str, float]:
        cost = model.task_cost(task)
        if epoch < self.taps_start_epoch():  # joint phase: deltas off, a task owns its norms and head only
            cost = task_cost_of(0, cost["gated_layers"], 0, cost["norm_params"], cost["head_params"],
                                cost["base_params"])
        return cost

    def optimizer_parameters(self, model):
        return list(model.named_parameters())  # the base is switched on and off: it stays in the optimizer

    def schedule_boundary(self, total, epochs, per_epoch):
        if not epochs:
            return 0
        start = self.taps_start_epoch()
        return min(total, start if per_epoch else total * start // epochs)


class _Baseline(Mode):
    copy_per_task = False
    train_backbone = True

    def build(self, net, tasks):
        return MultiHeadModel(net, tasks, copy_per_task=self.copy_per_task, train_backbone=self.train_backbone,
                              backbone_name=self.settings.backbone)


class FineTune(_Baseline):
    """A full backbone copy per task (the paper's paragon)."""

    copy_per_task = True


class LinearProbe(_Baseline):
    """A frozen feature extractor, heads only."""

    train_backbone = False


class JointFineTune(_Baseline):
    """One backbone trained by all tasks, a head per task."""


class Progressive(Mode):
    """Progressive task-specific LoRA adapters; tasks are grouped by the cosine similarity of
    their gradients on each stage's shared adapter, collected during the last warm-up epoch."""

    leaves_parameters_unused = True  # adapters not yet used during the warm-up

    def __init__(self, settings):
        super().__init__(settings)
        if settings.similarity_epochs < 1:
            raise ValueError("progressive mode needs similarity_epochs >= 1 (the shared warm-up)")
        self.task_grads: dict[str, list[Tensor]] = {}

    def build(self, net, tasks):
        s = self.settings
        return ProgressiveAdapterModel(net, tasks, rank=s.adapter_rank, num_stages=s.num_stages,
                                       schedule=s.adapter_schedule, backbone_name=s.backbone)

    def collects_gradients(self, model, epoch, batch_idx):
        return (not model.grouped and epoch == self.settings.similarity_epochs - 1
                and batch_idx < self.settings.similarity_batches)

    def collect(self, model: ProgressiveAdapterModel, losses: dict[str, Tensor]) -> None:
        """Add each task's gradient w.r.t. every stage's shared adapter (one vector per stage)."""
        params = [model.stage_parameters(s) for s in range(model.num_stages)]
        flat = [p for ps in params for p in ps]
        for task, loss in losses.items():
            grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat)]
            vectors, i = [], 0
            for ps in params:
                vectors.append(torch.cat([g.reshape(-1) for g in grads[i:i + len(ps)]]).detach().float())
                i += len(ps)
            acc = self.task_grads.setdefault(task, [torch.zeros_like(v) for v in vectors])
            for a, v in zip(acc, vectors):
                a += v

    def end_epoch(self, model: ProgressiveAdapterModel, epoch, reduce):
        if model.grouped or not self.task_grads or epoch != self.settings.similarity_epochs - 1:
            return None
        tasks, groups = model.tasks, {}
        for stage in range(model.num_stages):
            vectors = reduce(torch.stack([self.task_grads[t][stage] for t in tasks]))  # all ranks' batches
            self.similarity[stage] = cosine_similarity_matrix(vectors).cpu()
            clusters, _ = group_tasks(self.similarity[stage], model.schedule[stage])
            groups[stage] = [[tasks[i] for i in c] for c in clusters]
        model.assign(groups)
        self.grouping_epoch = epoch
        self.task_grads.clear()
        return "TAPS | progressive adapters grouped: " + "; ".join(
            f"stage {s}: {' | '.join(','.join(g) for g in gs)}" for s, gs in groups.items())


#: Every mode by its ``--model.mode`` name.
MODES: dict[str, type[Mode]] = {
    "incremental": Incremental, "joint": Joint, "memory_efficient": MemoryEfficient,
    "finetune": FineTune, "linear": LinearProbe, "joint_finetune": JointFineTune, "progressive": Progressive,
}
#: Modes that learn TAPS gates.
TAPS_MODES = tuple(name for name, mode in MODES.items() if mode.learns_gates)


def mode_class(name: str) -> type[Mode]:
    """The mode called ``name`` (``--model.mode``), or an error listing the modes."""
    if name not in MODES:
        raise SettingsError(f"--model.mode: unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]


def create_mode(name: str, settings: ModeSettings | Mapping[str, Any]) -> Mode:
    """The mode called ``name`` with ``settings`` (or a module's hyper-parameters to pick them from)."""
    return mode_class(name)(settings if isinstance(settings, ModeSettings) else ModeSettings.of(settings))
