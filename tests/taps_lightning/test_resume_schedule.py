"""Extending a run: one epoch, then a resume with more epochs, continues on the schedule the new
length defines (the restored optimizer held the finished one-epoch cosine's last rate, 0)."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module
from taps_lightning.training.schedules import cosine_restart

TINY = dict(backbone="test_resnet", lr=0.05, sparsity_warmup_epochs=0)


class _Rates(L.Callback):
    """The learning rate of every optimizer step."""

    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _run(tmp_path, folder, max_epochs, ckpt_path=None, **model):
    L.seed_everything(0)
    data = TinyTasks.make(n=32)
    module = create_taps_module(tasks=data.num_classes, mode="joint", **{**TINY, **model})
    rates = _Rates()
    trainer = taps_trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                        default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / folder, save_last=True),
                                                             rates])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, rates.rates


def test_one_epoch_then_resumed_to_two_equals_two_straight_bit_for_bit(tmp_path):
    straight, rates = _run(tmp_path, "straight", 2)
    steps = len(rates) // 2
    assert rates == [0.05] * steps + [0.05 * cosine_restart(1, 0, 2)] * steps  # 0.05, then 0.025
    _run(tmp_path, "split", 1)
    with pytest.warns(UserWarning, match=r"resumed after 1 epoch\(s\) onto another learning-rate schedule, a cosine "
                                         r"over 2 epochs \(the checkpoint's: a cosine over 1 epoch\)\. Training "
                                         r"continues on the new one, from 0.5 x the base learning rate"):
        resumed, resumed_rates = _run(tmp_path, "split", 2, ckpt_path=str(tmp_path / "split" / "last.ckpt"))
    assert resumed_rates == rates[steps:]  # not 0.0, the one-epoch cosine's end
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_per_step_cosine_resumes_on_the_new_schedule_at_once(tmp_path):
    _, rates = _run(tmp_path, "first", 1, scheduler="cosine_step")
    steps = len(rates)
    with pytest.warns(UserWarning, match=rf"after {steps} step\(s\) onto .*a cosine over {2 * steps} steps"):
        _, resumed = _run(tmp_path, "first", 2, ckpt_path=str(tmp_path / "first" / "last.ckpt"), scheduler="cosine_step")
    assert resumed == [pytest.approx(0.05 * cosine_restart(i, 0, 2 * steps)) for i in range(steps, 2 * steps)]
    assert resumed[0] == pytest.approx(0.025)


def test_a_resume_onto_a_new_schedule_that_has_ended_is_refused(tmp_path):
    _run(tmp_path, "a", 2)
    with pytest.raises(ValueError, match=r"resumed after 2 epoch\(s\) onto a cosine over 1 epoch \(the checkpoint's: "
                                         r"a cosine over 2 epochs\), which has ended: .*learning rate 0\. Set "
                                         r"--model.cosine_epochs above"):
        _run(tmp_path, "a", 3, ckpt_path=str(tmp_path / "a" / "last.ckpt"), cosine_epochs=1)


def test_loading_a_finished_schedules_state_sets_this_schedules_rate_at_once():
    """The scheduler on its own, as Lightning restores it (optimizer state first, then the
    scheduler's): a one-epoch cosine stepped once ends at rate 0; its state loaded into a
    two-epoch cosine must put the optimizer at that schedule's rate after one epoch,
    ``lr x (1 + cos(pi / 2)) / 2 = lr / 2``, at once, not 0 until the next ``step()``."""
    import math
    import warnings

    from taps_lightning.training.schedules import ResumableLambdaLR

    base = [0.1, 0.03]  # two groups (weights, scores), as fit's optimizer has

    def build(epochs):
        params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
        opt = torch.optim.SGD([{"params": params[:1], "lr": base[0]}, {"params": params[1:], "lr": base[1]}],
                              lr=base[0], momentum=0.9)
        sched = ResumableLambdaLR(opt, lambda i: cosine_restart(i, 0, epochs), f"a cosine over {epochs} epochs", "epoch")
        return opt, sched

    one_opt, one = build(1)
    one_opt.step()
    one.step()
    assert [g["lr"] for g in one_opt.param_groups] == [0.0, 0.0]  # the one-epoch cosine has ended
    opt, two = build(2)
    opt.load_state_dict(one_opt.state_dict())  # the restored optimizer holds rate 0
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resumed ... onto another learning-rate schedule"
        two.load_state_dict(one.state_dict())
    expected = [b * (1 + math.cos(math.pi / 2)) / 2 for b in base]  # float64, by hand
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert two.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    two.step()  # and the schedule goes on from there: epoch 2 of 2 is rate 0
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.0], abs=1e-15)
