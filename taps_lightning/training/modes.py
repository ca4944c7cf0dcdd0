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
from ..models.lora import LoRAModel
from ..models.progressive import ProgressiveAdapterModel, cosine_similarity_matrix, group_tasks
from .checks import SettingsError
from .settings import ModeSettings

__all__ = ["Mode", "ModeSettings", "MODES", "MODE_FLAGS", "GATE_FLAGS", "PROGRESSIVE_FLAGS", "LORA_FLAGS",
           "unused_flags", "create_mode", "mode_class"]


#: ``--model`` flags that only modes with gates read (with a budget, ``lam`` is not read either).
GATE_FLAGS = ("lam", "threshold", "score_init", "sparsity_warmup_epochs", "score_lr", "penalty", "penalty_divisor",
              "budget", "budget_rate", "recompute_weight", "freeze_gates_epochs")
#: ``--model`` flags that only the progressive adapters read.
PROGRESSIVE_FLAGS = ("adapter_rank", "num_stages", "adapter_schedule", "similarity_epochs", "similarity_batches")
#: ``--model`` flags that only the LoRA baseline reads.
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_grouped_convs")
#: Every ``--model`` flag that some modes read and others do not (the rest every mode reads).
MODE_FLAGS = GATE_FLAGS + PROGRESSIVE_FLAGS + LORA_FLAGS + ("joint_epochs",)


class Mode:
    """Defaults: a model whose parameters train as built, no penalty, no phases."""

    #: The ``--model.mode`` value.
    name = ""
    #: Whether the mode learns TAPS gates (the sparsity penalty, per-layer costs, budgets and
    #: task files with scores apply): the one name of "this mode has gates".
    learns_gates = False
    #: The :data:`MODE_FLAGS` this mode reads.
    reads: tuple[str, ...] = ()
    #: Whether some trained parameters sit out of the graph in some epochs (DDP must be told).
    leaves_parameters_unused = False
    #: Whether a :data:`MODE_FLAGS` flag this mode does not read is refused (:func:`unused_flags`
    #: as an error) rather than warned about.
    refuses_unused_flags = False

    def __init__(self, settings: ModeSettings) -> None:
        self.settings = settings
        #: Progressive grouping: each stage's task-gradient cosine similarities, and the epoch it was made.
        self.similarity: dict[int, Tensor] = {}
        self.grouping_epoch: int | None = None

    def build(self, net: nn.Module, tasks: Mapping[str, int]) -> MultiTaskModel:
        raise NotImplementedError

    def describe(self, lam_policy: Any, penalty: str) -> str:
        """The settings that shape this mode's tasks, for logs and report titles (``lam=0.5``,
        ``lora_rank=8 ...``; empty for a mode with none)."""
        if not self.learns_gates:
            return ""
        return lam_policy.describe() + (f", penalty={penalty}" if penalty != "layers" else "")

    def taps_start_epoch(self) -> int:
        """First epoch in which gates train."""
        return 0

    def penalty_active(self, epoch: int) -> bool:
        """Whether the sparsity penalty applies at ``epoch``: in modes with gates, once the
        sparsity warm-up is over."""
        return self.learns_gates and epoch >= self.taps_start_epoch() + self.settings.sparsity_warmup_epochs

    def enter_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        """Called at setup and at every training epoch's start."""

    def run_length_problems(self, max_epochs: int, freeze_gates_epochs: int) -> list[str]:
        """Settings that would silently do nothing in a run of ``max_epochs`` (each line names both
        flags): a phase that never starts, gates that never train. Checked before the first step."""
        if not self.learns_gates:
            return []
        found, start = [], self.taps_start_epoch()
        n = f"--trainer.max_epochs {max_epochs}"
        warmup = self.settings.sparsity_warmup_epochs
        if start + warmup >= max_epochs:
            found.append(f"--model.sparsity_warmup_epochs {warmup}" + (f" after --model.joint_epochs {start}" if start else "")
                         + f" >= {n}: the sparsity penalty never starts, so every layer stays task-specific and "
                         f"--model.lam/--model.budget do nothing; use fewer warm-up epochs or more epochs")
        if freeze_gates_epochs and max_epochs - freeze_gates_epochs <= start:
            found.append(f"--model.freeze_gates_epochs {freeze_gates_epochs} with {n}" + (f" and --model.joint_epochs "
                         f"{start}" if start else "") + ": the gates are frozen from the first TAPS epoch, so no "
                         "layer is ever selected (TAPS becomes per-task fine-tuning); freeze fewer epochs than the "
                         "TAPS epochs")
        return found

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

    name = "incremental"
    reads = GATE_FLAGS

    learns_gates = True
    freeze_base = True

    def build(self, net, tasks):
        s = self.settings
        config = TapsConfig(s.threshold, s.score_init, s.recompute_weight)
        return TapsModel(net, tasks=tasks, config=config, freeze_base=self.freeze_base, backbone_name=s.backbone)


class Joint(Incremental):
    """Eq. 4: the base is trained with all tasks."""

    name = "joint"

    freeze_base = False


class MemoryEfficient(Incremental):
    """Sec. 3.3: ``joint_epochs`` of joint training of base, norms and heads (gates off), then
    incremental TAPS on that base, with its own cosine cycle."""

    name = "memory_efficient"
    reads = GATE_FLAGS + ("joint_epochs",)

    leaves_parameters_unused = True  # the deltas during the joint phase

    def taps_start_epoch(self) -> int:
        return self.settings.joint_epochs

    def enter_epoch(self, model: TapsModel, epoch: int) -> None:
        joint_phase = epoch < self.taps_start_epoch()
        model.set_taps_enabled(not joint_phase)
        model.set_base_trainable(joint_phase)

    def run_length_problems(self, max_epochs, freeze_gates_epochs):
        if self.taps_start_epoch() >= max_epochs:  # the rest would repeat it
            return [f"--model.joint_epochs {self.taps_start_epoch()} >= --trainer.max_epochs {max_epochs}: the TAPS "
                    "phase never runs (memory-efficient mode would be joint fine-tuning of norms and heads); use "
                    "fewer joint epochs or more epochs"]
        return super().run_length_problems(max_epochs, freeze_gates_epochs)

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

    name = "finetune"

    copy_per_task = True


class LinearProbe(_Baseline):
    """A frozen feature extractor, heads only."""

    name = "linear"

    train_backbone = False


class JointFineTune(_Baseline):
    """One backbone trained by all tasks, a head per task."""

    name = "joint_finetune"


class Progressive(Mode):
    """Progressive task-specific LoRA adapters; tasks are grouped by the cosine similarity of
    their gradients on each stage's shared adapter, collected during the last warm-up epoch."""

    name = "progressive"
    reads = PROGRESSIVE_FLAGS

    leaves_parameters_unused = True  # adapters not yet used during the warm-up

    def __init__(self, settings):
        super().__init__(settings)  # similarity_epochs >= 1 (the shared warm-up): checked with the other settings
        self.task_grads: dict[str, list[Tensor]] = {}

    def describe(self, lam_policy, penalty):
        return f"adapter_rank={self.settings.adapter_rank}"

    def build(self, net, tasks):
        s = self.settings
        return ProgressiveAdapterModel(net, tasks, rank=s.adapter_rank, num_stages=s.num_stages,
                                       schedule=s.adapter_schedule, backbone_name=s.backbone)

    def run_length_problems(self, max_epochs, freeze_gates_epochs):
        epochs = self.settings.similarity_epochs
        if epochs >= max_epochs:
            return [f"--model.similarity_epochs {epochs} >= --trainer.max_epochs {max_epochs}: the tasks are grouped at "
                    "the end of the shared warm-up, so no epoch would train the grouped adapters; use fewer "
                    "similarity epochs or more epochs"]
        return []

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


class LoRA(Mode):
    """The LoRA baseline: PEFT's LoRA, one adapter per task, on a frozen backbone, with the task
    norms and heads of TAPS. A flag of another mode (``--model.lam``, the gate and progressive
    flags) is refused: it would do nothing."""

    name = "lora"
    reads = LORA_FLAGS
    refuses_unused_flags = True

    def describe(self, lam_policy, penalty):
        s = self.settings
        return (f"lora_rank={s.lora_rank}, lora_alpha={s.lora_alpha if s.lora_alpha is not None else s.lora_rank}, "
                f"lora_grouped_convs={s.lora_grouped_convs}")

    def build(self, net, tasks):
        s = self.settings
        return LoRAModel(net, tasks, rank=s.lora_rank, alpha=s.lora_alpha, dropout=s.lora_dropout,
                         grouped_convs=s.lora_grouped_convs, backbone_name=s.backbone)


#: Every mode by its ``--model.mode`` name.
MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (
    Incremental, Joint, MemoryEfficient, FineTune, LinearProbe, JointFineTune, Progressive, LoRA)}


def unused_flags(mode: type[Mode], flags: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """The flags given a value other than their default that would do nothing in ``mode`` (the mode
    does not read them, or another flag replaces them), one line each naming both."""
    changed = [k for k in MODE_FLAGS if k in flags and k in defaults and flags[k] != defaults[k]]
    notes = []
    for key in changed:
        if key not in mode.reads:
            readers = ", ".join(m.name for m in MODES.values() if key in m.reads)
            notes.append(f"--model.{key} {flags[key]!r} does nothing with --model.mode {mode.name} (read by {readers})")
    if mode.learns_gates and flags.get("budget") is not None and "lam" in changed:
        notes.append(f"--model.lam {flags['lam']!r} does nothing with --model.budget {flags['budget']}: each task's "
                     "lambda comes from the budget controller")
    if mode.learns_gates and flags.get("budget") is None and "budget_rate" in changed:
        notes.append(f"--model.budget_rate {flags['budget_rate']!r} does nothing without --model.budget")
    return notes


def mode_class(name: str) -> type[Mode]:
    """The mode called ``name`` (``--model.mode``), or an error listing the modes."""
    if name not in MODES:
        raise SettingsError(f"--model.mode: unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]


def create_mode(name: str, settings: ModeSettings | Mapping[str, Any]) -> Mode:
    """The mode called ``name`` with ``settings`` (or a module's hyper-parameters to pick them from)."""
    return mode_class(name)(settings if isinstance(settings, ModeSettings) else ModeSettings.of(settings))
