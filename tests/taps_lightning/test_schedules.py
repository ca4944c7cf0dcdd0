"""Learning-rate schedules: the cosine with a restart for memory-efficient's TAPS phase (per step
and per epoch), the per-epoch cosine against torch's CosineAnnealingLR, and the authors' recipe
preset step for step against their training loop written out."""
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import TINY, TinyTasks
from helpers import cpu_trainer as _trainer
from taps_lightning.training.compose import create_taps_module

ROOT = Path(__file__).resolve().parents[2]


def test_cosine_schedule_restarts_for_the_taps_phase():
    from taps_lightning.training.schedules import cosine_restart

    assert cosine_restart(0, 0, 100) == 1.0 and cosine_restart(50, 0, 100) == pytest.approx(0.5)
    assert cosine_restart(100, 0, 100) == pytest.approx(0.0)
    assert cosine_restart(20, 40, 100) == pytest.approx(0.5)  # middle of the joint phase
    assert cosine_restart(40, 40, 100) == 1.0  # the TAPS phase starts at the full rate
    assert cosine_restart(70, 40, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("scheduler", ["cosine_step", "cosine"])
def test_memory_efficient_cosine_restarts_at_full_rate_when_the_taps_phase_starts(scheduler, tmp_path):
    """2 joint epochs then 3 of TAPS, 3 optimizer steps an epoch (24 samples, batches of 8): the
    learning rate of every step (``cosine_step``) or epoch (``cosine``) follows a cosine from the
    full rate over the joint phase, and a second one from the full rate again at step
    joint_epochs x steps_per_epoch = 6 (epoch 2), written out here."""
    import math

    data = TinyTasks.make(n=24, batch_size=8)
    module = create_taps_module(tasks=data.num_classes, mode="memory_efficient", joint_epochs=2, scheduler=scheduler,
                        **{**TINY, "lr": 0.2}, score_lr=0.3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    _trainer(tmp_path, max_epochs=5, limit_val_batches=0, callbacks=[Spy()]).fit(module, data)
    steps_per_epoch = 3
    assert [epoch for epoch, _ in seen] == [e for e in range(5) for _ in range(steps_per_epoch)]

    def cosine(i, length):
        return 0.5 * (1 + math.cos(math.pi * i / length))

    if scheduler == "cosine_step":
        boundary, total = 2 * steps_per_epoch, 5 * steps_per_epoch
        factors = [cosine(i, boundary) if i < boundary else cosine(i - boundary, total - boundary)
                   for i in range(total)]
    else:  # once per epoch: every step of an epoch at that epoch's rate
        factors = [cosine(e, 2) if e < 2 else cosine(e - 2, 3) for e in range(5) for _ in range(steps_per_epoch)]
    expected = [rate * f for f in factors for rate in (0.2, 0.3)]  # the weights, and the scores' own rate
    assert [lr for _, lrs in seen for lr in lrs] == pytest.approx(expected, abs=1e-12)
    first_taps_step = 2 * steps_per_epoch
    assert seen[first_taps_step][1] == pytest.approx([0.2, 0.3], abs=1e-12)  # back to the full rate
    assert seen[first_taps_step - 1][1][0] < 0.2 * 0.9  # and not before


def test_authors_recipe_preset_step_equals_their_loop(tmp_path):
    """configs/imagenet_to_sketch/authors_recipe.yaml through Lightning (accumulate_grad_batches, averaged gradients,
    its lr) against the authors' train_sequential.py loop written out: 8 batches' summed gradients,
    ``lam * sum|s| / 52 + CE``, plain-momentum SGD at their lr, one step per 8 batches."""
    import copy

    import torch.nn.functional as F
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "imagenet_to_sketch" / "authors_recipe.yaml").read_text())
    model_cfg, accumulate = cfg["model"], cfg["trainer"]["accumulate_grad_batches"]
    assert accumulate == 8 and model_cfg["nesterov"] is False
    assert model_cfg["weight_decay"] == 0 and model_cfg["score_lr"] is None
    their_lr, lam = 0.01, model_cfg["lam"]  # their options.py default --lr

    keys = ("lam", "threshold", "score_init", "penalty_divisor", "lr", "momentum", "nesterov", "weight_decay",
            "score_lr", "scheduler", "cosine_epochs")
    data = TinyTasks.make(tasks=("a",), classes=(4,), n=64, batch_size=4)
    L.seed_everything(0)
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes, mode="incremental",
                        **{k: model_cfg[k] for k in keys}, sparsity_warmup_epochs=0)  # penalty on from the start
    theirs = copy.deepcopy(module.model)
    initial = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    batches = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append([t.clone() for t in batch["a"]])

    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2 * accumulate, limit_val_batches=0,
                       accumulate_grad_batches=accumulate, callbacks=[Record()])
    trainer.fit(module, data)
    assert trainer.global_step == 2 and len(batches) == 16  # two optimizer steps: momentum is exercised

    theirs.train().set_task("a")
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, their_lr, momentum=model_cfg["momentum"], weight_decay=0.0)
    for i, (x, y) in enumerate(batches):
        scores = [layer.taps_score["a"] for _, layer in theirs.taps_layers()]
        loss = lam * sum(abs(s) for s in scores) / 52 + F.cross_entropy(theirs(x), y)
        loss.backward()
        if (i + 1) % 8 == 0:
            optimizer.step()
            optimizer.zero_grad()
    ours = dict(module.model.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=1e-5, atol=1e-7, msg=name)
    moved = {n.split(".")[-2] if "taps_" in n else n.split(".")[0] for n, p in theirs.named_parameters()
             if not torch.equal(p, initial[n])}
    assert {"taps_delta", "taps_score", "heads"} <= moved  # the steps changed every kind of parameter


def test_per_epoch_cosine_is_their_cosine_annealing(tmp_path):
    """``scheduler cosine`` + ``cosine_epochs`` = torch's CosineAnnealingLR(T_max) stepped once per
    epoch, run one epoch past T_max as the authors do (that epoch at lr 0)."""
    data = TinyTasks.make(tasks=("a",), classes=(4,), n=8, batch_size=4)
    module = create_taps_module(tasks=data.num_classes, **TINY, scheduler="cosine", cosine_epochs=3)
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[Spy()]).fit(module, data)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], TINY["lr"])
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=3)
    expected = []
    for _ in range(4):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        annealing.step()
    assert seen == pytest.approx(expected, abs=1e-12) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"--model.cosine_epochs must be an integer >= 1 .*got 0"):
        create_taps_module(tasks=data.num_classes, **TINY, cosine_epochs=0)
    with pytest.raises(ValueError, match=r"--model.penalty_divisor must be > 0 .*got -52"):
        create_taps_module(tasks=data.num_classes, **TINY, penalty_divisor=-52)
