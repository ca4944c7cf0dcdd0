"""A run resumed from its last checkpoint ends bit for bit where an uninterrupted one does, and a
checkpoint of another setup is refused (resuming onto a new schedule: test_resume_schedule.py)."""
import lightning as L
import pytest
import torch

from helpers import TINY, TinyTasks
from helpers import cpu_trainer as _trainer
from taps_lightning.training.compose import create_taps_module


#: The LoRA baseline refuses TINY's gate flag (sparsity_warmup_epochs); dropout draws random numbers to resume.
LORA_TINY = dict(backbone="test_resnet", lr=0.05, mode="lora", lora_rank=2, lora_dropout=0.2)


@pytest.mark.parametrize("flags", [dict(TINY, mode="joint"), LORA_TINY], ids=["joint", "lora"])
def test_resume_equals_uninterrupted_run(tmp_path, flags):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Interrupt(L.Callback):  # stop after the first epoch, as a killed job would
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def run(ckpt_path=None, folder="a", interrupt=False):
        L.seed_everything(0)
        data = TinyTasks.make(n=32)
        module = create_taps_module(tasks=data.num_classes, **flags)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)] + ([Interrupt()] if interrupt else [])
        trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer

    straight, t_straight = run(folder="straight")
    _, t_first = run(folder="split", interrupt=True)
    assert t_first.current_epoch == 1
    resumed, t_resumed = run(ckpt_path=str(tmp_path / "split" / "last.ckpt"), folder="split")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert t_straight.callback_metrics["val/acc"] == t_resumed.callback_metrics["val/acc"]
    # the checkpoint loads with weights_only=True (no pickled code)
    torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)


def test_checkpoint_from_another_setup_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    other = create_taps_module(tasks=data.num_classes, **{**TINY, "backbone": "test_efficientnet"})
    with pytest.raises(ValueError, match="checkpoint was trained with backbone='test_resnet'.*test_efficientnet"):
        _trainer(tmp_path, max_epochs=2).fit(other, data, ckpt_path=str(tmp_path / "last.ckpt"))


@pytest.mark.parametrize("scheduler, factor", [("cosine", 0.5), ("none", 1.0)])
def test_a_resume_trains_with_the_optimizer_flags_it_was_resumed_with(tmp_path, scheduler, factor):
    """Lightning restores the optimizer's param groups whole, so without care a resume with another
    --model.lr (or momentum, weight decay) would train on with the checkpoint's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen = {}

    class Groups(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = [(g["lr"], g["momentum"], g["weight_decay"])
                                           for g in trainer.optimizers[0].param_groups]

    def run(epochs, ckpt_path=None, **flags):
        data = TinyTasks.make(n=16)
        module = create_taps_module(tasks=data.num_classes, scheduler=scheduler, cosine_epochs=2, **{**TINY, **flags})
        trainer = _trainer(tmp_path, max_epochs=epochs, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), Groups()])
        trainer.fit(module, data, ckpt_path=ckpt_path)

    run(1, lr=0.05, score_lr=0.2, momentum=0.9)
    with pytest.warns(UserWarning, match=r"changed --model settings, which apply from here on: .*lr 0.05 -> 0.02"):
        run(2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), lr=0.02, score_lr=0.1, momentum=0.5,
            weight_decay=1e-3)
    # the weights' group, then the scores' (no weight decay); a 2-epoch cosine is at 0.5 after one epoch
    assert seen[1] == [(pytest.approx(0.02 * factor, rel=1e-12), 0.5, 1e-3),
                       (pytest.approx(0.1 * factor, rel=1e-12), 0.5, 0.0)]
