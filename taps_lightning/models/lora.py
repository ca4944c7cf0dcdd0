"""The LoRA baseline, as people use it: Hugging Face PEFT's LoRA, one named adapter per task.

Every ``Conv2d``/``Linear`` of the backbone (the classifier is removed first: each task has its
own head) gets a PEFT LoRA layer through PEFT's own :func:`peft.inject_adapter_in_model` and
:class:`peft.LoraConfig`, called once per task with the task's name as the adapter name. The
task-specific norms and the heads are those of TAPS, so the two methods differ only in how the
shared weights are adapted; the backbone stays frozen.

Grouped and depthwise convolutions: PEFT 0.21's LoRA accepts a grouped ``Conv2d`` only when the
rank is a multiple of its groups, builds its ``lora_A`` over all input channels (not a low-rank
delta of the layer's own weight) and cannot merge it (``NotImplementedError``), so they are
never given LoRA here. ``grouped_convs="frozen"`` (the default) leaves them shared;
``"full"`` trains a full copy of each per task through PEFT's ``modules_to_save``, the fair
variant on backbones (MobileNet, EfficientNet) where they hold much of the network's function.

Each PEFT layer sits in a thin :class:`~taps_lightning.core.task_layer.TaskLayer` wrapper, so
switching tasks, counting, task files and :func:`~taps_lightning.merge` work as for every
other model; PEFT's state (``lora_A``/``lora_B`` per adapter) is read through PEFT's own
attributes and :meth:`get_delta_weight`.
"""
from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.inject import find_task_layers, inject_task_norms, strip_classifier
from ..core.signature import base_fingerprint, task_layout_signature
from ..core.task_layer import TaskLayer
from .multitask import MultiTaskModel, default_backbone_name, task_cost_of

__all__ = ["LoRAModel", "PeftLoRALayer", "PeftFullLayer", "lora_targets", "lora_state_shapes", "DEFAULT_LORA_RANK", "GROUPED_CONVS"]

#: LoRA rank unless told otherwise (``--model.lora_rank``; PEFT's own default).
DEFAULT_LORA_RANK = 8
#: The adapter PEFT's layers are created with, deleted at once (:meth:`LoRAModel._create_peft_layers`).
_TEMPLATE = "_template"
#: What happens to grouped/depthwise convolutions, which PEFT's LoRA cannot adapt
#: (``--model.lora_grouped_convs``): shared and frozen, or a full copy trained per task.
GROUPED_CONVS = ("frozen", "full")


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def lora_targets(backbone: nn.Module) -> tuple[list[str], list[str]]:
    """``(lora_names, grouped_names)``: the Conv2d (``groups == 1``) and Linear layers PEFT's LoRA
    adapts, and the grouped/depthwise convolutions it cannot, in registration order."""
    gated, _ = find_task_layers(backbone)
    kinds = {name: backbone.get_submodule(name) for name in gated}
    unsupported = [f"{n} ({type(m).__name__})" for n, m in kinds.items() if not isinstance(m, (nn.Conv2d, nn.Linear))]
    if unsupported:
        raise ValueError(f"LoRA adapts Conv2d and Linear layers; {type(backbone).__name__} also has "
                         f"{', '.join(unsupported[:3])}, which the LoRA baseline does not handle")
    return ([n for n, m in kinds.items() if not _is_grouped(m)], [n for n, m in kinds.items() if _is_grouped(m)])


def lora_state_shapes(base: nn.Module, rank: int) -> dict[str, torch.Size]:
    """The shapes of PEFT's ``lora_A``/``lora_B`` weights on ``base`` at ``rank`` (a Conv2d's
    ``lora_A`` is a convolution like ``base``, its ``lora_B`` a 1x1 convolution)."""
    if isinstance(base, nn.Linear):
        return {"lora_A": torch.Size([rank, base.in_features]), "lora_B": torch.Size([base.out_features, rank])}
    return {"lora_A": torch.Size([rank, base.in_channels, *base.kernel_size]),
            "lora_B": torch.Size([base.out_channels, rank, 1, 1])}


@contextmanager
def _keeping_trainability(module: nn.Module) -> Iterator[None]:
    """Undo what PEFT's ``set_adapter``/``delete_adapter`` do to ``requires_grad`` (they make the
    active adapter alone trainable): here every task trains in the same step, and which
    parameters train is the model's decision (:meth:`LoRAModel.set_trainable`)."""
    before = {id(p): p.requires_grad for p in module.parameters()}
    try:
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(before.get(id(p), p.requires_grad))


class _PeftTaskLayer(TaskLayer, nn.Module):
    """A PEFT tuner layer (``self.tuner``) seen through the task-layer verbs: a task is a PEFT adapter
    of the same name, created by :meth:`LoRAModel.add_task` through PEFT's injection."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.tuner = tuner

    @property
    def adapters(self) -> nn.ModuleDict:
        """Task -> PEFT's state of it (the first of :attr:`adapter_layer_names`): which tasks exist."""
        return getattr(self, self.adapter_layer_names[0])

    @property
    def tasks(self) -> list[str]:
        return list(self.adapters.keys())

    def add_task(self, task: str) -> None:
        if task not in self.adapters:  # the model injects the adapter through PEFT first
            raise RuntimeError(f"no PEFT adapter {task!r} here; add tasks with LoRAModel.add_task")

    def set_task(self, task: str | None) -> None:
        self.active_task = task
        if task is not None:
            with _keeping_trainability(self):
                self.tuner.set_adapter(task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for name in self.adapter_layer_names:
            yield from getattr(self, name)[task].parameters()

    def forward(self, x: Tensor) -> Tensor:
        if self.active_task is None:  # the shared backbone alone
            return self.base_layer(x)
        return self.tuner(x)


class PeftLoRALayer(_PeftTaskLayer):
    """A PEFT ``lora.Conv2d``/``lora.Linear``: per task ``lora_A``, ``lora_B``; the delta is PEFT's
    ``get_delta_weight`` (``B @ A * lora_alpha / r``). ``rank``: every adapter's ``r``."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, tuner: nn.Module, rank: int) -> None:
        super().__init__(tuner)
        self.rank = int(rank)

    @property
    def lora_A(self) -> nn.ModuleDict:
        return self.tuner.lora_A

    @property
    def lora_B(self) -> nn.ModuleDict:
        return self.tuner.lora_B

    @property
    def base_layer(self) -> nn.Module:
        return self.tuner.base_layer

    def _drop_task(self, task: str) -> None:
        with _keeping_trainability(self), warnings.catch_warnings():  # which task runs is set_task's
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.tuner.delete_adapter(task)

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        return {"delta": self.tuner.get_delta_weight(task).detach()}

    def merged_layer(self, task: str) -> nn.Module:
        plain = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            plain.weight.add_(self.tuner.get_delta_weight(task).to(plain.weight.dtype))
        return plain

    def state_shapes(self) -> dict[str, torch.Size]:
        return lora_state_shapes(self.base_layer, self.rank)

    def task_state(self, task: str) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A[task].weight.detach(), "lora_B": self.lora_B[task].weight.detach()}

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        self._check_state(state)
        with torch.no_grad():
            self.lora_A[task].weight.copy_(state["lora_A"])
            self.lora_B[task].weight.copy_(state["lora_B"])


class PeftFullLayer(_PeftTaskLayer):
    """A PEFT ``ModulesToSaveWrapper``: a full copy of the layer per task (``full.<key>`` in files)."""

    adapter_layer_names = ("copies",)

    @property
    def copies(self) -> nn.ModuleDict:
        return self.tuner.modules_to_save

    @property
    def base_layer(self) -> nn.Module:
        return self.tuner.original_module

    def _drop_task(self, task: str) -> None:
        others = [t for t in self.adapters if t != task]
        with _keeping_trainability(self):
            self.tuner.delete_adapter(task, new_active_adapters=others[:1])

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        return self.task_state(task)

    def merged_layer(self, task: str) -> nn.Module:
        return copy.deepcopy(self.copies[task])

    def state_shapes(self) -> dict[str, torch.Size]:
        return {f"full.{k}": v.shape for k, v in self.base_layer.state_dict().items()}

    def task_state(self, task: str) -> dict[str, Tensor]:
        return {f"full.{k}": v.detach() for k, v in self.copies[task].state_dict().items()}

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        self._check_state(state)
        with torch.no_grad():
            self.copies[task].load_state_dict({k[len("full."):]: v for k, v in state.items()})


class LoRAModel(MultiTaskModel):
    """A frozen backbone with one PEFT LoRA adapter per task, task-specific norms and a head per task.

    Args:
        backbone: timm/torchvision classifier (its classifier is removed).
        tasks: ``{task: num_classes}`` to create now; more with :meth:`add_task`.
        rank: LoRA rank ``r`` (PEFT's ``LoraConfig.r``).
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (default ``alpha = r``: 1, as
            the progressive adapters' :class:`~taps_lightning.models.progressive.LoRALayer`).
        dropout: ``lora_dropout``, on the input of each adapter.
        grouped_convs: ``"frozen"`` (shared) or ``"full"`` (a full copy trained per task, PEFT's
            ``modules_to_save``): what happens to the grouped convolutions PEFT's LoRA cannot adapt.
        backbone_name: name stored in task files (default: timm architecture or class name).
    """

    task_file_kind = "lora"

    def __init__(self, backbone: nn.Module, tasks: Mapping[str, int] | None = None, rank: int = DEFAULT_LORA_RANK,
                 alpha: float | None = None, dropout: float = 0.0, grouped_convs: str = "frozen",
                 backbone_name: str | None = None) -> None:
        super().__init__()
        if grouped_convs not in GROUPED_CONVS:
            raise ValueError(f"grouped_convs must be one of {GROUPED_CONVS}, got {grouped_convs!r}")
        self.classifier = strip_classifier(backbone)
        self.num_features = self.classifier.num_features
        self.backbone_name = backbone_name or default_backbone_name(backbone)
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.dropout, self.grouped_convs = float(dropout), grouped_convs
        self.lora_names, self.grouped_names = lora_targets(backbone)
        _, self.norm_names = find_task_layers(backbone)
        inject_task_norms(backbone, self.norm_names)
        self.backbone = backbone
        self._create_peft_layers()
        for task, num_classes in (tasks or {}).items():
            self.add_task(task, num_classes)
        if tasks:
            self.set_task(next(iter(tasks)))

    @property
    def full_names(self) -> list[str]:
        """The grouped convolutions trained in full per task (none when they are frozen)."""
        return self.grouped_names if self.grouped_convs == "full" else []

    def _peft_layers(self) -> Iterator[tuple[str, _PeftTaskLayer]]:
        for name, layer in self.task_layers():
            if isinstance(layer, _PeftTaskLayer):
                yield name, layer

    def lora_config(self, wrapped: bool = True):
        """PEFT's ``LoraConfig`` of one task's adapter: the layers by exact name (``wrapped``: inside
        this package's wrappers)."""
        from peft import LoraConfig

        def names(layers: Sequence[str]) -> list[str]:
            return [f"{n}.tuner" if wrapped else n for n in layers]

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          target_modules=names(self.lora_names), modules_to_save=names(self.full_names) or None)

    def _inject(self, adapter: str, wrapped: bool = True) -> None:
        """PEFT's own injection of adapter ``adapter`` into every adapted layer."""
        from peft import inject_adapter_in_model

        with warnings.catch_warnings():  # every adapter after the first finds PEFT's config of the first
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            inject_adapter_in_model(self.lora_config(wrapped), self.backbone, adapter_name=adapter)
        if hasattr(self.backbone, "peft_config"):  # PEFT's record; the adapters' settings are the model's
            del self.backbone.peft_config

    def _create_peft_layers(self) -> None:
        """PEFT makes its layers when it injects an adapter: inject a template, wrap each layer, and
        delete the template (the layers stay, with no adapter: a model with no task yet)."""
        from ..core.inject import set_submodule

        self._inject(_TEMPLATE, wrapped=False)
        for name in [*self.lora_names, *self.full_names]:
            tuner = self.backbone.get_submodule(name)
            layer = PeftLoRALayer(tuner, self.rank) if name in self.lora_names else PeftFullLayer(tuner)
            set_submodule(self.backbone, name, layer)
            layer._drop_task(_TEMPLATE)

    # -- tasks ---------------------------------------------------------------------------
    def add_task(self, task: str, num_classes: int) -> None:
        """A new PEFT adapter named ``task`` on every adapted layer (``B = 0``: the task starts
        from the pre-trained function), copies of the pre-trained norms and a new head."""
        self._check_new_task(task, num_classes)
        self._inject(task)
        for _, layer in self.task_layers():
            layer.add_task(task)
        self.heads[task] = self._new_head(num_classes)
        self.set_trainable()
        self.set_task(self.active_task)  # PEFT activates the new adapter; the active task stays active

    def remove_task(self, task: str) -> None:
        self._check_task(task)
        for _, layer in self.task_layers():
            layer.remove_task(task)
        del self.heads[task]
        self.set_task(None if self.active_task == task else self.active_task)

    def set_trainable(self) -> None:
        """The shared backbone frozen; every task's adapters, norms and head trained (PEFT's
        injection freezes all but its new adapter)."""
        self.backbone.requires_grad_(False)
        for p in self.task_parameters():
            p.requires_grad_(True)

    # -- forward, parameters, cost -------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def task_cost(self, task: str) -> dict[str, float]:
        """``delta_params``: the task's LoRA matrices (and full copies); ``active_layers``: the layers
        it adapts; ``gated_layers``: every Conv/Linear of the backbone (the layers TAPS could select)."""
        self._check_task(task)
        delta = sum(p.numel() for _, layer in self._peft_layers() for p in layer.task_parameters(task))
        adapted = len(self.lora_names) + len(self.full_names)
        return task_cost_of(adapted, len(self.lora_names) + len(self.grouped_names), delta,
                            *self.norm_and_head_params(task), self.base_param_count)

    # -- export --------------------------------------------------------------------------
    def _base_of(self, name: str) -> nn.Module:
        module = self.backbone.get_submodule(name)
        return module.base_layer if isinstance(module, _PeftTaskLayer) else module

    def file_layout(self) -> str:
        """:func:`~taps_lightning.core.signature.task_layout_signature` of what a task file holds:
        each adapted layer's LoRA (or full-copy) shapes and each norm's, from the model's structure
        (the same with or without tasks)."""
        entries = [(n, "lora", lora_state_shapes(self._base_of(n), self.rank)) for n in self.lora_names]
        entries += [(n, "full", {k: v.shape for k, v in self._base_of(n).state_dict().items()}) for n in self.full_names]
        entries += [(n, "norm", {k: v.shape for k, v in self.backbone.get_submodule(n).base_norm.state_dict().items()})
                    for n in self.norm_names]
        return task_layout_signature(entries)

    def task_file_metadata(self, task: str) -> dict[str, str]:
        """A task file holds the task's ``lora_A``/``lora_B`` of each layer (and full copies), its
        norms and head, tied to this backbone's layout and shared weights."""
        return {
            "task": task, "backbone": self.backbone_name, "num_classes": str(self.heads[task].out_features),
            "lora_rank": str(self.rank), "lora_alpha": json.dumps(self.alpha),
            "lora_grouped_convs": self.grouped_convs, "task_layout_signature": self.file_layout(),
            "base_fingerprint": base_fingerprint(self),
        }
