"""TapsModule's public behaviour: constructor and fit-time refusals, the optimizer's parameter
groups, a non-finite loss, the hyperparameters it keeps, the metrics it logs, and its costs."""
import hashlib

import pytest
import timm
import torch
from torch import nn

from helpers import TINY, TinyTasks
from helpers import cpu_trainer as _trainer
from taps_lightning.training.checks import SettingsError
from taps_lightning.training.compose import create_taps_module, flag_defaults


def test_bad_configuration_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'jointt'; choose one of incremental, joint"):
        create_taps_module(tasks={"a": 2}, mode="jointt")
    with pytest.raises(ValueError, match="unknown backbone 'resnet5O'"):
        create_taps_module(backbone="resnet5O", tasks={"a": 2})
    with pytest.raises(ValueError, match="no tasks"):
        create_taps_module(backbone="test_resnet")
    data = TinyTasks.make()
    module = create_taps_module(tasks={"a": 4, "b": 7}, **TINY)  # b has 3 classes in the data
    with pytest.raises(ValueError, match=r"disagree with the data's \{'a': 4, 'b': 3\}"):
        _trainer(tmp_path).fit(module, data)


def test_nan_loss_stops_with_step_and_task(tmp_path):
    data = TinyTasks.make(nan_task="b")
    module = create_taps_module(tasks=data.num_classes, **TINY)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, global step 0, batch 0, task\(s\) \['b'\]"):
        _trainer(tmp_path).fit(module, data)


def test_scores_have_their_own_lr_and_no_weight_decay():
    """One plain SGD step (no momentum): ``s - score_lr * g`` for scores, ``p - lr * (g + wd * p)`` for the rest."""
    lr, score_lr, wd = 0.1, 0.3, 0.01
    module = create_taps_module(tasks={"a": 3}, mode="joint", **{**TINY, "lr": lr}, score_lr=score_lr, weight_decay=wd,
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
    create_taps_module(tasks={"a": 3}, weights=str(weights), weights_sha256=digest.upper(), **TINY)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        create_taps_module(tasks={"a": 3}, weights=str(weights), weights_sha256="0" * 64, **TINY)
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        create_taps_module(tasks={"a": 3}, weights=str(weights), weights_sha256="abc", **TINY)


def test_hparams_keep_every_argument_with_the_digest_as_sha256sum_prints_it(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    module = create_taps_module(tasks={"a": 3}, **TINY, lam=0.3, weights=str(weights), weights_sha256=f" {digest.upper()}")
    assert set(module.hparams) == set(flag_defaults())  # every flag: what a checkpoint records, and a resume compares
    assert module.hparams["weights_sha256"] == digest
    assert (module.hparams["lam"], module.hparams["tasks"], module.hparams["mode"]) == (0.3, {"a": 3}, "incremental")
    assert module.hparams["penalty"] is None  # as given (as LightningCLI records it); resolved in the settings:
    assert module.gate_settings.penalty == "layers"  # the paper's, without a budget
    assert create_taps_module(tasks={"a": 3}, **TINY, penalty="params").gate_settings.penalty == "params"
    assert create_taps_module(tasks={"a": 3}, **TINY, budget=0.2).gate_settings.penalty == "params"  # a budget's default


def test_an_unknown_mode_is_refused_first_and_an_unknown_scheduler_with_the_other_settings():
    with pytest.raises(ValueError, match="^--model.mode: unknown mode 'dora'; choose one of incremental, joint, memory_efficient, "
                                         "finetune, linear, joint_finetune, progressive, lora$"):
        create_taps_module(mode="dora", lr=-1.0)  # neither the missing tasks nor the bad lr reported first
    with pytest.raises(SettingsError) as info:
        create_taps_module(tasks={"a": 3}, **{**TINY, "scheduler": "cos", "lr": -1.0})
    assert str(info.value).split("\n  - ")[1:] == [
        "--model.lr must be a finite number > 0, got -1.0",
        "--model.scheduler must be one of cosine (per epoch), cosine_step (per optimizer step), none, got 'cos'"]


def _plain_counts():
    """Parameters of a plain timm test_resnet without its classifier: all, the convolutions'
    weights (it has no Linear and no conv bias), and its BatchNorms' weights and biases."""
    plain = timm.create_model("test_resnet", num_classes=0)
    base = sum(p.numel() for p in plain.parameters())
    convs = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.Conv2d))
    norms = sum(p.numel() for m in plain.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 15 and plain.num_features == 96
    return base, convs, norms


def _head(classes):
    return 96 * classes + classes


@pytest.mark.parametrize("mode", ["incremental", "joint", "memory_efficient", "finetune", "linear", "joint_finetune"])
def test_task_cost_and_total_params_multiple_by_hand(mode):
    """Before training (epoch 0): every TAPS layer on (score_init 0.15 >= 0.1), memory-efficient in
    its joint phase (a task owns its norms and head only), fine-tuning a whole copy per task."""
    base, convs, norms = _plain_counts()
    own = {"incremental": convs + norms, "joint": convs + norms, "memory_efficient": norms, "finetune": base,
           "linear": 0, "joint_finetune": 0}[mode]
    layers = {"incremental": 15, "joint": 15, "finetune": 15}.get(mode, 0)
    module = create_taps_module(tasks={"a": 3, "b": 5}, **TINY, mode=mode)
    for task, classes in (("a", 3), ("b", 5)):
        cost = module.task_cost(task)
        assert (cost["active_layers"], cost["gated_layers"], cost["base_params"]) == (layers, 15, base), task
        assert cost["task_params"] == own + _head(classes), task
        assert cost["fraction"] == pytest.approx((own + _head(classes)) / base, rel=1e-12), task
    expected = (base + 2 * own + _head(3) + _head(5)) / base
    assert module.total_params_multiple() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["linear", "incremental"])
def test_the_metrics_logged_by_name_and_the_mean_accuracy(mode, tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY, mode=mode, recalibrate_batches=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    common = {"train/loss", "train/loss_epoch", "train/a/loss", "train/b/loss", "val/a/acc", "val/b/acc", "val/acc"}
    if mode == "linear":
        assert set(metrics) == common
    else:  # (train/lam left out: how lambda is logged is being redesigned)
        assert set(metrics) - {"train/lam"} == common | {
            "train/sparsity", "val/a/active_layers", "val/b/active_layers", "val/a/task_params_fraction",
            "val/b/task_params_fraction", "taps/a/gate_flips", "taps/b/gate_flips"}
        base, convs, norms = _plain_counts()
        # one step of lr 0.05 x lam 0.5 / 15 lowers a score by 0.0017 from 0.15: every layer is still on
        for task, classes in (("a", 4), ("b", 3)):
            assert float(metrics[f"val/{task}/active_layers"]) == 15
            assert float(metrics[f"val/{task}/task_params_fraction"]) == pytest.approx(
                (convs + norms + _head(classes)) / base)
            assert float(metrics[f"taps/{task}/gate_flips"]) == 0
    assert float(metrics["val/acc"]) == pytest.approx((float(metrics["val/a/acc"]) + float(metrics["val/b/acc"])) / 2)
