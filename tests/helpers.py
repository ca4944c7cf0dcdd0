"""Small builders shared by the tests."""
import timm
import torch

import taps_lightning as tl


def randomize_tasks(model: tl.TapsModel, scale: float = 0.05, off: tuple[str, ...] = ()) -> None:
    """Give every task random deltas, norms and scores; layers named in ``off`` get a score below tau."""
    with torch.no_grad():
        for name, layer in model.taps_layers():
            for task in layer.tasks:
                layer.taps_delta[task].normal_(0, scale)
                layer.taps_score[task].fill_(0.05 if name in off else 0.2)
        for _, norm in model.task_norms():
            for task_norm in norm.norms.values():
                for p in task_norm.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
                if hasattr(task_norm, "running_mean") and task_norm.running_mean is not None:
                    task_norm.running_mean.normal_(0, 0.1)
                    task_norm.running_var.uniform_(0.5, 1.5)


def tiny_resnet(tasks=None, **kwargs) -> tl.TapsModel:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    return tl.TapsModel(backbone, tasks=tasks or {"a": 3, "b": 5}, **kwargs)
