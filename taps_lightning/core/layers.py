"""Task-adaptive wrapper layers (one per wrapped layer kind, as PEFT's tuner layers).

Why wrappers and not ``torch.nn.utils.parametrize``: parametrize renames state-dict keys
in a way that depends on registration, has open issues with ``torch.compile`` and DDP, and
recomputes the parametrization on every ``.weight`` access with no hook to skip it for
inactive layers. A small wrapper builds the gated weight once per forward (and, with
``recompute_weight``, once more in backward instead of keeping it), runs the wrapped layer's
own conv/linear with it (never ``base(x) + conv(x, delta)``, which would double the FLOPs),
caches the merged weight for inference, and exposes ``.weight`` as the gated weight so
blocks that read ``module.weight`` directly still see TAPS.
"""
from __future__ import annotations

import copy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CONV_TYPES, GATED_TYPES, TapsConfig
from .fused import fusable, gated_layer_forward
from .gate import closed_score, compose_weight, gate_open, gated_weight
from .task_layer import TaskLayer

__all__ = ["TapsLayer", "create_taps_layer", "call_with_weight"]


def call_with_weight(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """Run ``layer`` on ``x`` with ``weight`` in place of ``layer.weight``, computed once: the
    layer's own conv/linear for the plain types, its own ``forward`` (``functional_call``)
    for subclasses that override it. Every weight-composing adapter here runs through this."""
    kind = type(layer)
    if kind in CONV_TYPES:
        return layer._conv_forward(x, weight, layer.bias)
    if kind is nn.Linear:
        return F.linear(x, weight, layer.bias)
    return torch.func.functional_call(layer, {"weight": weight}, (x,), strict=False)


def base_layer_getattr(self: nn.Module, name: str):
    """``__getattr__`` of weight wrappers: attributes such as ``in_features`` or ``stride``
    that the wrapper lacks come from the wrapped ``base_layer``."""
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        if name == "base_layer":
            raise
        return getattr(self._modules["base_layer"], name)


class TapsLayer(TaskLayer, nn.Module):
    """Shared ``base_layer`` plus, per task, a weight delta and a scalar score.

    ``w = base.weight + I(score >= threshold) * delta[task]`` for the active task; with no
    active task the layer is exactly the wrapped base layer. Plain Conv/Linear run the fused
    autograd function; subclasses with their own ``forward`` (timm ``StdConv2d``,
    ``Conv2dSame``) run it with the gated weight swapped in.

    Args:
        base_layer: the layer to adapt (its ``weight`` is the shared base weight).
        config: the model's :class:`~taps_lightning.core.config.TapsConfig` (threshold, initial
            score, ``recompute_weight``), shared by every layer of the model.
    """

    adapter_layer_names = ("taps_delta", "taps_score")

    def __init__(self, base_layer: nn.Module, config: TapsConfig | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config or TapsConfig()
        self._fusable = fusable(base_layer)
        self.taps_delta = nn.ParameterDict()
        self.taps_score = nn.ParameterDict()
        self.active_task: str | None = None
        self.taps_enabled = True
        self.gate_hint: tuple[str, bool] | None = None  # (task, active), set by TapsModel per forward
        self._merged_cache: dict[str, tuple[tuple, Tensor]] = {}

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def recompute_weight(self) -> bool:
        return self.config.recompute_weight

    # -- task bookkeeping (TaskLayer verbs) ------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.taps_score.keys())

    def add_task(self, task: str) -> None:
        """Create a zero delta and a score of ``score_init`` for ``task``. The delta has the base
        weight's memory format (e.g. channels_last), so ``dL/dw`` lands in it without a copy."""
        weight = self.base_layer.weight
        self.taps_delta[task] = nn.Parameter(torch.zeros_like(weight))
        self.taps_score[task] = nn.Parameter(torch.tensor(self.config.score_init, device=weight.device,
                                                          dtype=torch.float32))

    def _drop_task(self, task: str) -> None:
        del self.taps_delta[task]
        del self.taps_score[task]
        self._merged_cache.pop(task, None)

    def task_parameters(self, task: str):
        yield self.taps_delta[task]
        yield self.taps_score[task]

    def score(self, task: str) -> nn.Parameter:
        """``task``'s score ``s`` (a trainable fp32 scalar)."""
        return self.taps_score[task]

    def delta(self, task: str) -> nn.Parameter:
        """``task``'s weight delta (what it adds when its gate is open)."""
        return self.taps_delta[task]

    def close_gate(self, task: str) -> None:
        """Switch ``task``'s layer off, trainable still: its score just under ``tau``."""
        with torch.no_grad():
            self.taps_score[task].fill_(closed_score(self.threshold))

    def is_active(self, task: str) -> bool:
        """Whether ``task`` uses its own weights here (``score >= threshold``); syncs with the device."""
        return bool(gate_open(self.taps_score[task], self.threshold))

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        return {"delta": self.taps_delta[task].detach()} if self.is_active(task) else {}

    def merged_layer(self, task: str) -> nn.Module:
        plain = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            plain.weight.copy_(compose_weight(plain.weight, self.taps_delta[task].detach().to(plain.weight.dtype),
                                              self.is_active(task)))
        return plain

    def state_shapes(self) -> dict[str, torch.Size]:
        return {"score": torch.Size([1]), "delta": self.base_layer.weight.shape}

    def task_state(self, task: str) -> dict[str, Tensor]:
        """The score always, the delta only while the gate is open (a closed layer stores nothing)."""
        return {"score": self.taps_score[task].detach().reshape(1), **self.task_tensors(task)}

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        self._check_state(state)
        with torch.no_grad():
            self.taps_score[task].copy_(state["score"].reshape(()))
            if "delta" in state:
                self.taps_delta[task].copy_(state["delta"])

    # -- the gated weight --------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The weight the active task sees (blocks that read ``.weight`` directly get TAPS)."""
        return self._gated_weight()

    def _gated_weight(self) -> Tensor:
        base = self.base_layer.weight
        task = self.active_task
        if task is None or not self.taps_enabled:
            return base
        delta, score = self.taps_delta[task], self.taps_score[task]
        if self.training or torch.is_grad_enabled():
            return gated_weight(base, delta, score, self.threshold, self._hinted_active(task))
        # Inference: build the merged weight once and reuse it until a tensor changes in place.
        key = (self.threshold, base._version, delta._version, score._version,
               base.data_ptr(), delta.data_ptr(), score.data_ptr(), base.dtype, delta.dtype)
        cached = self._merged_cache.get(task)
        if cached is not None and cached[0] == key:
            return cached[1]
        merged = compose_weight(base, delta, self.is_active(task))
        self._merged_cache[task] = (key, merged)
        return merged

    def _hinted_active(self, task: str) -> bool:
        hint = self.gate_hint
        return hint[1] if hint is not None and hint[0] == task else self.is_active(task)

    def clear_cache(self) -> None:
        self._merged_cache.clear()

    def train(self, mode: bool = True) -> "TapsLayer":
        # The inference cache holds a weight copy per task; never keep it while training.
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() invalidate cached weights
        self.clear_cache()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        task = self.active_task
        if (self.recompute_weight and self._fusable and task is not None and self.taps_enabled
                and torch.is_grad_enabled()):
            return gated_layer_forward(self.base_layer, x, self.taps_delta[task], self.taps_score[task],
                                       self._hinted_active(task))
        return call_with_weight(self.base_layer, x, self._gated_weight())

    __getattr__ = base_layer_getattr

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, tasks={self.tasks}, active_task={self.active_task}, "
                f"recompute_weight={self.recompute_weight}")


def check_gatable(module: nn.Module) -> None:
    if not isinstance(module, GATED_TYPES):
        raise TypeError(f"cannot adapt {type(module).__name__}: adapters wrap {', '.join(t.__name__ for t in GATED_TYPES)}")


def create_taps_layer(module: nn.Module, config: TapsConfig | None = None) -> TapsLayer:
    """Wrap ``module`` (a Conv1d/2d/3d or Linear, subclasses included) in a :class:`TapsLayer`."""
    check_gatable(module)
    return TapsLayer(module, config)
