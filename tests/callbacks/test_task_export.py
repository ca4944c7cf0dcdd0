"""``TaskExport`` (callbacks/export.py): which weights are written, and what the files carry."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

import taps_lightning as tl
from callbacks import TaskExport
from helpers import TINY, TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module


def _set_scores(module, value: float) -> None:
    with torch.no_grad():
        for _, layer in module.model.taps_layers():
            for task in layer.tasks:
                layer.taps_score[task].fill_(value)


class CloseEveryGate(L.Callback):
    """After every training batch, every task's gates closed (score 0.05 < tau): each validated and
    checkpointed state stores norms and head only, within any budget that can be met."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _set_scores(pl_module, 0.05)


class OpenEveryGateAtTheEnd(L.Callback):
    """When training ends, after the last checkpoint: every gate open (score 0.5), so the final
    weights store every delta, far over a budget of 0.5."""

    def on_train_end(self, trainer, pl_module):
        _set_scores(pl_module, 0.5)


def test_budget_run_exports_the_tested_weights_and_nothing_of_an_over_budget_end(tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, budget=0.5, **TINY)
    export = TaskExport()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=None)
    trainer = taps_trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[CloseEveryGate(), OpenEveryGateAtTheEnd(), export, ckpt],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data)
    adapters = tmp_path / "ckpt" / "adapters"
    # the final weights hold every gate open: over the budget, so nothing is written after fit
    assert all(layer.taps_score[t].item() == 0.5 for _, layer in module.model.taps_layers() for t in ("a", "b"))
    assert not adapters.exists() or not any(adapters.iterdir())
    assert export.paths == {}
    trainer.test(module, data, ckpt_path=ckpt.best_model_path, verbose=False, weights_only=True)
    stored = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    for task in ("a", "b"):
        path = adapters / f"{task}.safetensors"
        assert export.paths[task] == path and path.is_file()
        assert tl.task_metadata(path)["active_layers"] == "0"
        tensors = load_file(path)
        scores = {k: v for k, v in tensors.items() if k.startswith("score.")}
        assert len(scores) == 15 and all(float(v) == pytest.approx(0.05) for v in scores.values())
        assert not [k for k in tensors if k.startswith("delta.")]  # no delta of the open final gates
        torch.testing.assert_close(tensors["head.weight"], stored[f"model.heads.{task}.weight"], rtol=0, atol=0)


def test_exported_task_files_carry_the_datamodules_class_names(tmp_path):
    data = TinyTasks.make()
    names = {"a": ["zero", "one", "two", "three"], "b": ["=x", "y z", "ü"]}
    data.class_names = lambda task: names[task]  # what ImageFolderTasks / EmbeddedDigits return
    module = create_taps_module(tasks=data.num_classes, **TINY)
    trainer = taps_trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[TaskExport(), ModelCheckpoint(dirpath=tmp_path / "ckpt")],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=1)
    trainer.fit(module, data)
    for task in ("a", "b"):
        assert tl.task_metadata(tmp_path / "ckpt" / "adapters" / f"{task}.safetensors")["class_names"] == names[task]
