"""``create_taps_model``: a ``TapsModel`` from a timm architecture name."""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Mapping

import timm
import torch
from torch import nn

from ..core.config import SCORE_INIT, THRESHOLD
from .taps_model import TapsModel
from ..errors import SettingsError

__all__ = ["create_backbone", "create_taps_model", "load_weights", "input_mean_std", "check_weights_file"]


def _refuse_other_kinds(path: str, state) -> None:
    """A checkpoint of ``experiments.fit`` or a task file is not backbone weights: say what to use."""
    if isinstance(state, dict) and "pytorch-lightning_version" in state:
        raise SettingsError(f"--model.weights {path} is a Lightning checkpoint, not backbone weights: resume it with "
                            f"--ckpt_path {path}, or evaluate it with `python -m experiments.evaluate --ckpt_path {path}`")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            kind = (f.metadata() or {}).get("format", "")
        if kind.endswith("-task/1"):  # the formats taps_lightning.files.export writes
            raise SettingsError(f"--model.weights {path} is a task file ({kind}), not backbone weights: load it onto "
                                f"its base with --tasks_from {path} (experiments.evaluate / predict) or "
                                "taps_lightning.load_task")


def _read_state_dict(path: str | os.PathLike) -> dict:
    """A name -> tensor dict from a ``.safetensors`` file or a tensor-only torch file.

    Torch files are always read with ``weights_only=True`` (whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says): a weights file never needs to run code.
    """
    path = str(path)
    expected = ("expected a state dict of tensors saved with torch.save(model.state_dict(), ...) "
                "or safetensors.torch.save_file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, SafetensorError, ...
        if isinstance(err, pickle.UnpicklingError):
            reason = "not a torch file, or a pickle holding Python objects besides tensors, which is never executed"
        else:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path}: cannot read the weights file ({reason}); {expected}") from None
    _refuse_other_kinds(path, state)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__} with values other than tensors; {expected}")
    return state


def check_weights_file(path: str | os.PathLike, sha256: str | None) -> None:
    """Refuse a weights file whose SHA-256 is not ``sha256`` (lower-case hex; ``None``: unchecked)."""
    if sha256 is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise ValueError(f"{path}: SHA-256 differs from the expected {sha256}; the file is not the one "
                         "the experiment was set up with (re-install it or drop weights_sha256)")


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a local weights file into ``model`` (which has no classifier).

    Keys are matched by name first. A file from another library with the same layers in the
    same order (e.g. torchvision's MobileNetV2 file for timm's ``mobilenetv2_100``) is mapped
    tensor by tensor in order, but only if every shape agrees; its classifier, absent from
    ``model``, is dropped. Returns ``"by name"`` or ``"by order"``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; give the path of a local .pth/.safetensors file")
    state = _read_state_dict(path)
    target = model.state_dict()
    named = {k: v for k, v in state.items() if k in target}
    if len(named) == len(target) and all(named[k].shape == target[k].shape for k in target):
        model.load_state_dict(named)
        return "by name"
    source = list(state.items())[: len(target)]
    mismatch = [
        f"{tk} {tuple(tv.shape)} <- {sk} {tuple(sv.shape)}"
        for (tk, tv), (sk, sv) in zip(target.items(), source)
        if tv.shape != sv.shape
    ]
    if len(source) < len(target) or mismatch:
        raise ValueError(
            f"{path}: cannot load into {type(model).__name__}: {len(named)}/{len(target)} keys match by name and "
            f"mapping by order fails ({'; '.join(mismatch[:3]) or 'file has too few tensors'}). "
            "Check that the file is for this architecture."
        )
    model.load_state_dict({tk: sv for tk, (_, sv) in zip(target, source)})
    return "by order"


def create_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None, **kwargs: Any):
    """A timm model without classifier.

    Args:
        name: any ``timm.list_models()`` name.
        pretrained: download the hub weights (never done by the tests).
        weights: a local weights file (``.pth``/``.bin``/``.safetensors``), see :func:`load_weights`;
            no network access.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; pick a name from timm.list_models(), e.g. 'resnet50'")
    model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def input_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the model's inputs are normalised with: its timm ``pretrained_cfg``
    (0.5/0.5 for most ViTs, ImageNet's for most CNNs; ImageNet's if it has none)."""
    cfg = timm.data.resolve_model_data_config(model)
    return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))


def create_taps_model(
    backbone: str,
    tasks: Mapping[str, int] | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    threshold: float = THRESHOLD,
    score_init: float = SCORE_INIT,
    freeze_base: bool = True,
    **timm_kwargs: Any,
) -> TapsModel:
    """``TapsModel(create_backbone(backbone, ...), tasks, ...)``."""
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, **timm_kwargs)
    return TapsModel(net, tasks=tasks, threshold=threshold, score_init=score_init,
                     freeze_base=freeze_base, backbone_name=backbone)
