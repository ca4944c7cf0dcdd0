"""Find the layers TAPS adapts, by module type, and swap in the wrappers.

No per-architecture code: every ``Conv*d``/``Linear`` (including attention ``qkv``/``proj``
and MLP linears of transformer blocks) is gated, every norm layer becomes task-specific,
and the classifier is removed because each task brings its own head.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .layers import GATED_TYPES, TapsLayer, create_taps_layer
from .norms import NORM_TYPES, TaskNorm

__all__ = ["inject_taps", "strip_classifier", "set_submodule"]

_CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads", "head.fc", "last_linear")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _final_linear(module: nn.Module, name: str) -> tuple[str, nn.Linear] | None:
    if isinstance(module, nn.Linear):
        return name, module
    if isinstance(module, nn.Sequential):
        for child_name, child in reversed(list(module.named_children())):
            found = _final_linear(child, f"{name}.{child_name}")
            if found:
                return found
    return None


def strip_classifier(backbone: nn.Module) -> tuple[str | None, int]:
    """Replace the backbone's classifier by ``nn.Identity``.

    Returns ``(path, num_features)``: where the classifier was (so :func:`merge` can put a
    task head back) and the width of the features that reach it. Works for timm models
    (``pretrained_cfg['classifier']``, ``num_features``) and torchvision models (``fc``,
    ``classifier``, ``heads``).
    """
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = ([cfg["classifier"]] if isinstance(cfg.get("classifier"), str) else []) + list(_CLASSIFIER_NAMES)
    for name in names:
        try:
            module = backbone.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Identity) and hasattr(backbone, "num_features"):
            return name, int(backbone.num_features)
        found = _final_linear(module, name)
        if found:
            path, linear = found
            set_submodule(backbone, path, nn.Identity())
            return path, linear.in_features
    if hasattr(backbone, "num_features"):
        return None, int(backbone.num_features)
    raise ValueError(
        f"cannot find the classifier of {type(backbone).__name__}: looked for {', '.join(_CLASSIFIER_NAMES)}. "
        "Pass a backbone whose forward returns pooled features and give `num_features=`."
    )


def inject_taps(
    backbone: nn.Module,
    threshold: float = 0.1,
    score_init: float = 0.15,
    exclude: Iterable[str] = (),
    wrap_layer: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[list[str], list[str]]:
    """Wrap every gated layer and norm of ``backbone`` in place.

    Args:
        backbone: the model, classifier already removed.
        threshold: ``tau`` of the default TAPS layer.
        score_init: initial score of new tasks in the default TAPS layer.
        exclude: module names (or name prefixes) left untouched.
        wrap_layer: the wrapper to put around each Conv/Linear (default: the TAPS layer);
            other weight adapters (e.g. progressive LoRA adapters) reuse this injection.

    Returns:
        ``(gated_names, norm_names)`` in registration order.
    """
    wrap_layer = wrap_layer or (lambda m: create_taps_layer(m, threshold, score_init))
    excluded = tuple(exclude)

    def skip(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in excluded)

    gated, norms = [], []
    wrapped: set[str] = set()
    for name, module in backbone.named_modules():
        parts = name.split(".")
        if not name or skip(name) or any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            continue
        if isinstance(module, (TapsLayer, TaskNorm)) or getattr(module, "is_weight_adapter", False):
            raise ValueError(f"{name} is already wrapped by TAPS; wrap an unmodified backbone")
        if isinstance(module, GATED_TYPES):
            gated.append(name)
            wrapped.add(name)
        elif isinstance(module, NORM_TYPES):
            norms.append(name)
            wrapped.add(name)
    for name in gated:
        set_submodule(backbone, name, wrap_layer(backbone.get_submodule(name)))
    for name in norms:
        set_submodule(backbone, name, TaskNorm(backbone.get_submodule(name)))
    if not gated:
        raise ValueError(f"{type(backbone).__name__} has no Conv/Linear layer to gate")
    return gated, norms
