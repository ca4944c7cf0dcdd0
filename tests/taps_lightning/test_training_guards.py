"""Guards of a run: gate settings a baseline has no use for change nothing, an endless cosine and a
resume with another threshold are refused, a diverged model is never evaluated into a checkpoint
(the settings refused outright: test_checks.py)."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module

TINY = dict(backbone="test_resnet", lr=0.05, sparsity_warmup_epochs=0)


def _trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tmp_path)
    args.update(kw)
    return taps_trainer(**args)


@pytest.mark.parametrize("mode", ["linear", "finetune", "joint_finetune", "progressive"])
def test_baselines_ignore_gate_settings(mode):
    """Gate settings that TAPS refuses (a threshold above score_init) and a large lambda change
    nothing in a mode without gates: the same model, no gated layer, the same loss, which is the
    cross-entropy alone, and the same costs as with the defaults."""
    import torch.nn.functional as F

    from taps_lightning.core.layers import TapsLayer

    gates = dict(threshold=0.2, score_init=0.15, lam=3.0)
    with pytest.raises(ValueError, match=r"--model.score_init 0.15 < --model.threshold 0.2"):
        create_taps_module(tasks={"a": 3}, **{**TINY, "mode": "incremental", **gates})  # where gates exist: refused
    tasks = {"a": 3, "b": 4}
    torch.manual_seed(0)
    odd = create_taps_module(tasks=tasks, **{**TINY, "mode": mode, **gates}).train()
    torch.manual_seed(0)
    plain = create_taps_module(tasks=tasks, **{**TINY, "mode": mode}).train()
    assert not odd.mode.learns_gates and odd.task_lam("a") is None and not odd.mode.penalty_active(10)
    assert not any(isinstance(m, TapsLayer) for m in odd.modules())
    a, b = odd.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert all(odd.task_cost(t) == plain.task_cost(t) for t in tasks)

    torch.manual_seed(1)
    batch = {t: (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])) for t in tasks}
    loss = odd.training_step(batch, 0)
    assert torch.equal(loss, plain.training_step(batch, 0))
    with torch.no_grad():  # the cross-entropy alone: no lambda x anything added
        ce = sum(float(F.cross_entropy(odd.model(x, t), y)) for t, (x, y) in batch.items())
    assert float(loss) == pytest.approx(ce, rel=1e-6)


def test_endless_run_with_a_cosine_schedule_says_what_to_set(tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    with pytest.raises(ValueError, match=r"cosine schedule needs a finite run.*--trainer.max_epochs N.*"
                                         r"--model.scheduler none"):
        _trainer(tmp_path, max_epochs=-1).fit(module, data)


def test_resume_with_another_threshold_is_refused(tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    other = create_taps_module(tasks=data.num_classes, **{**TINY, "threshold": 0.12})
    with pytest.raises(ValueError, match=r"checkpoint was trained with threshold=0.1, but this run has threshold=0.12"):
        _trainer(tmp_path, max_epochs=2).fit(other, data, ckpt_path=str(tmp_path / "last.ckpt"))


class _BlowUpHead(L.Callback):
    """At the start of the given epoch's validation, scale one head so its logits overflow to inf
    (finite weights, non-finite logits, as after a divergence)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.model.heads["b"].weight.fill_(3e38)  # finite, but any sum of two overflows
                pl_module.model.heads["b"].bias.fill_(3e38)


def test_non_finite_validation_stops_the_run_and_keeps_no_such_checkpoint(tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/acc", mode="max",
                           filename="best-{epoch:02d}", auto_insert_metric_name=False)
    trainer = _trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[ckpt, _BlowUpHead(epoch=1)])
    with pytest.raises(FloatingPointError, match=r"non-finite logits in val at epoch 1 .*b: \d+ samples"):
        trainer.fit(module, data)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best-00.ckpt", "last.ckpt"]
    for path in (tmp_path / "ckpt").iterdir():
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
