"""``create_taps_model``: a ``TapsModel`` from a timm architecture name."""
from __future__ import annotations

import os
from typing import Any, Mapping

import timm

from .model import TapsModel

__all__ = ["create_backbone", "create_taps_model"]


def create_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None, **kwargs: Any):
    """A timm model without classifier.

    Args:
        name: any ``timm.list_models()`` name.
        pretrained: download the hub weights (never done by the tests).
        weights: a local weights file (``.pth``/``.bin``/``.safetensors``) loaded through timm's
            ``pretrained_cfg_overlay``; no network access.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; pick a name from timm.list_models(), e.g. 'resnet50'")
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights} does not exist; give the path of a local .pth/.safetensors")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def create_taps_model(
    backbone: str,
    tasks: Mapping[str, int] | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    threshold: float = 0.1,
    score_init: float = 0.15,
    freeze_base: bool = True,
    **timm_kwargs: Any,
) -> TapsModel:
    """``TapsModel(create_backbone(backbone, ...), tasks, ...)``."""
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, **timm_kwargs)
    return TapsModel(net, tasks=tasks, threshold=threshold, score_init=score_init,
                     freeze_base=freeze_base, backbone_name=backbone)
