"""TapsModule's public behaviour: constructor and fit-time refusals, the optimizer's parameter
groups, a non-finite loss, the hyperparameters it keeps, the metrics it logs, and its costs."""
import hashlib

import pytest
import torch

from helpers import TINY, TinyTasks
from helpers import cpu_trainer as _trainer
from taps_lightning.module import TapsModule


def test_bad_configuration_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'jointt'; choose one of incremental, joint"):
        TapsModule(tasks={"a": 2}, mode="jointt")
    with pytest.raises(ValueError, match="unknown backbone 'resnet5O'"):
        TapsModule(backbone="resnet5O", tasks={"a": 2})
    with pytest.raises(ValueError, match="no tasks"):
        TapsModule(backbone="test_resnet")
    data = TinyTasks.make()
    module = TapsModule(tasks={"a": 4, "b": 7}, **TINY)  # b has 3 classes in the data
    with pytest.raises(ValueError, match=r"disagree with the data's \{'a': 4, 'b': 3\}"):
        _trainer(tmp_path).fit(module, data)


def test_nan_loss_stops_with_step_and_task(tmp_path):
    data = TinyTasks.make(nan_task="b")
    module = TapsModule(tasks=data.num_classes, **TINY)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, global step 0, batch 0, task\(s\) \['b'\]"):
        _trainer(tmp_path).fit(module, data)


def test_scores_have_their_own_lr_and_no_weight_decay():
    """One plain SGD step (no momentum): ``s - score_lr * g`` for scores, ``p - lr * (g + wd * p)`` for the rest."""
    lr, score_lr, wd = 0.1, 0.3, 0.01
    module = TapsModule(tasks={"a": 3}, mode="joint", **{**TINY, "lr": lr}, score_lr=score_lr, weight_decay=wd,
                        momentum=0.0, scheduler="none")
    optimizer = module.configure_optimizers()
    params = dict(module.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert any(".taps_score." in n for n in params) and any(".base_layer." in n for n in params)
    for name, p in params.items():
        if not p.requires_grad:  # the norms' pre-trained templates
            expected = before[name]
        elif ".taps_score." in name:
            expected = before[name] - score_lr
        else:  # deltas, the shared base (joint mode), task norms and heads
            expected = before[name] - lr * (1 + wd * before[name])
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f"{name}: {m}")


def test_sha256_is_case_insensitive_and_checked(tmp_path):
    import timm

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    TapsModule(tasks={"a": 3}, weights=str(weights), weights_sha256=digest.upper(), **TINY)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        TapsModule(tasks={"a": 3}, weights=str(weights), weights_sha256="0" * 64, **TINY)
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        TapsModule(tasks={"a": 3}, weights=str(weights), weights_sha256="abc", **TINY)
