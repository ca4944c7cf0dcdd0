"""Find the layers TAPS adapts, by module type, and swap in the wrappers.

No per-architecture code: every ``Conv*d``/``Linear`` (including attention ``qkv``/``proj``
and MLP linears of transformer blocks) is gated, every norm layer becomes task-specific,
and the classifier is removed because each task brings its own head.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from .config import GATED_TYPES, TapsConfig
from .layers import create_taps_layer
from .norms import NORM_TYPES, TaskNorm
from .task_layer import TaskLayer

__all__ = ["inject_taps", "find_task_layers", "inject_task_norms", "strip_classifier", "restore_classifier", "Classifier", "set_submodule"]

#: Where torchvision and other non-timm classifiers keep their final layer (fallback search).
_CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads", "head.fc", "last_linear")


class Classifier(NamedTuple):
    """What :func:`strip_classifier` removed.

    ``path``: where the classifier sat, now ``nn.Identity`` (a tuple for models with two
    heads, e.g. LeViT and distilled DeiT: ``("head", "head_dist")``; ``None`` for a feature
    extractor); ``num_features``: width of the pooled features that reached it; ``conv``:
    whether it was a 1x1 convolution (BiT ResNetV2, DLA) rather than a ``Linear``.
    """

    path: str | tuple[str, ...] | None
    num_features: int
    conv: bool = False


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _final_layer(module: nn.Module) -> nn.Module | None:
    """The last Linear/Conv in ``module`` (itself if it is one): the layer that makes the logits."""
    layers = [m for m in module.modules() if isinstance(m, GATED_TYPES)]
    return layers[-1] if layers else None


def _width(layer: nn.Linear | nn.Conv2d) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)


def _is_timm_model(backbone: nn.Module) -> bool:
    return all(callable(getattr(backbone, f, None)) for f in ("reset_classifier", "get_classifier"))


def _strip_timm(backbone: nn.Module) -> Classifier:
    """timm's own verbs: ``reset_classifier(1)`` shows the classifier layer(s) of the model
    (also when it was created with ``num_classes=0``), ``reset_classifier(0)`` removes them."""
    name = type(backbone).__name__
    with torch.random.fork_rng(devices=[]):  # the throwaway 1-class probe leaves the caller's RNG as it was
        backbone.reset_classifier(1)
        found = backbone.get_classifier()
    probes = found if isinstance(found, tuple) else (found,)
    ids = {id(m): i for i, m in enumerate(probes)}
    paths = [""] * len(probes)
    for path, module in backbone.named_modules():
        if id(module) in ids:
            paths[ids[id(module)]] = path
    layers = [_final_layer(m) for m in probes]
    if not all(paths) or any(layer is None for layer in layers):
        raise ValueError(f"cannot find the classifier of timm model {name}: get_classifier() after reset_classifier(1) "
                         f"returned {[type(m).__name__ for m in probes]}, not a Linear/Conv head of the model")
    for path, layer in zip(paths, layers):
        if not (isinstance(layer, nn.Linear) or (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1))):
            raise ValueError(f"timm model {name}: its classifier at {path} is {layer}; a task head replaces "
                             "a Linear or 1x1 Conv2d classifier only")
    widths = {_width(layer) for layer in layers}
    conv = {isinstance(layer, nn.Conv2d) for layer in layers}
    if len(widths) != 1 or len(conv) != 1:
        raise ValueError(f"timm model {name}: its classifiers {paths} differ in input width or kind; "
                         "one task head cannot replace them")
    backbone.reset_classifier(0)
    for path in paths:
        if not isinstance(backbone.get_submodule(path), nn.Identity):
            raise ValueError(f"timm model {name}: reset_classifier(0) left {path} as "
                             f"{type(backbone.get_submodule(path)).__name__}, not nn.Identity; cannot remove its classifier")
    return Classifier(paths[0] if len(paths) == 1 else tuple(paths), widths.pop(), conv.pop())


def _strip_by_name(backbone: nn.Module, num_features: int | None) -> Classifier:
    """torchvision and plain modules: the last ``Linear`` under a conventional classifier name."""
    for name in _CLASSIFIER_NAMES:
        try:
            module = backbone.get_submodule(name)
        except AttributeError:
            continue
        linears = [(f"{name}.{n}" if n else name, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if linears and isinstance(module, (nn.Linear, nn.Sequential)):
            path, linear = linears[-1]
            set_submodule(backbone, path, nn.Identity())
            return Classifier(path, linear.in_features)
    if num_features is not None:
        return Classifier(None, int(num_features))
    raise ValueError(
        f"cannot find the classifier of {type(backbone).__name__}: it is not a timm model and has no Linear under "
        f"{', '.join(_CLASSIFIER_NAMES)}. Remove the classifier yourself and pass the feature width "
        "(TapsModel(..., num_features=N)) for a backbone whose forward returns pooled features."
    )


def strip_classifier(backbone: nn.Module, num_features: int | None = None) -> Classifier:
    """Replace the backbone's classifier by ``nn.Identity``, so that its forward returns the
    pooled features, and say where it was (for :func:`~taps_lightning.merge`).

    timm models go through timm's own ``reset_classifier``/``get_classifier`` (Linear, 1x1
    conv and two-head classifiers alike; the feature width is the classifier's input, i.e.
    timm's ``head_hidden_size``). Other modules: the last ``Linear`` of ``fc``, ``classifier``,
    ``head(s)`` or ``last_linear`` (torchvision); a module without one is taken as a feature
    extractor only when ``num_features`` is given, and refused otherwise.
    """
    if _is_timm_model(backbone):
        return _strip_timm(backbone)
    return _strip_by_name(backbone, num_features)


def restore_classifier(model: nn.Module, classifier: Classifier, head: nn.Linear) -> nn.Module:
    """Put ``head`` where :func:`strip_classifier` found the classifier (a 1x1 convolution with the
    same weights if it was one; a copy at each path of a two-head model). Returns the model
    (wrapped as ``Sequential(model, head)`` for a feature extractor)."""
    if classifier.path is None:
        return nn.Sequential(model, head)
    if classifier.conv:
        conv = nn.Conv2d(head.in_features, head.out_features, 1, bias=head.bias is not None,
                         device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(head.weight[:, :, None, None])
            if head.bias is not None:
                conv.bias.copy_(head.bias)
        head = conv
    paths = (classifier.path,) if isinstance(classifier.path, str) else classifier.path
    for path in paths:
        set_submodule(model, path, copy.deepcopy(head))
    return model


def find_task_layers(backbone: nn.Module, exclude: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """``(gated_names, norm_names)``: every ``Conv*d``/``Linear`` and every norm layer of ``backbone``
    in registration order, outside ``exclude`` (module names or name prefixes) and not inside
    another found layer. A layer already wrapped by a per-task layer is refused."""
    excluded = tuple(exclude)

    def skip(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in excluded)

    gated, norms = [], []
    found: set[str] = set()
    for name, module in backbone.named_modules():
        parts = name.split(".")
        if not name or skip(name) or any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            continue
        if isinstance(module, TaskLayer):
            raise ValueError(f"{name} is already wrapped by TAPS; wrap an unmodified backbone")
        if isinstance(module, GATED_TYPES):
            gated.append(name)
            found.add(name)
        elif isinstance(module, NORM_TYPES):
            norms.append(name)
            found.add(name)
    if not gated:
        raise ValueError(f"{type(backbone).__name__} has no Conv/Linear layer to gate")
    return gated, norms


def inject_task_norms(backbone: nn.Module, names: Iterable[str]) -> None:
    """Make each norm layer ``names`` lists task-specific (a :class:`~taps_lightning.core.norms.TaskNorm`)."""
    for name in names:
        set_submodule(backbone, name, TaskNorm(backbone.get_submodule(name)))


def inject_taps(
    backbone: nn.Module,
    config: TapsConfig | None = None,
    exclude: Iterable[str] = (),
    wrap_layer: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[list[str], list[str]]:
    """Wrap every gated layer and norm of ``backbone`` in place.

    Args:
        backbone: the model, classifier already removed.
        config: the settings of the default TAPS layer (threshold, initial score, ...).
        exclude: module names (or name prefixes) left untouched.
        wrap_layer: the wrapper to put around each Conv/Linear (default: the TAPS layer);
            other weight adapters (e.g. progressive LoRA adapters) reuse this injection.

    Returns:
        ``(gated_names, norm_names)`` in registration order (:func:`find_task_layers`).
    """
    wrap_layer = wrap_layer or (lambda m: create_taps_layer(m, config))
    gated, norms = find_task_layers(backbone, exclude)
    for name in gated:
        set_submodule(backbone, name, wrap_layer(backbone.get_submodule(name)))
    inject_task_norms(backbone, norms)
    return gated, norms
