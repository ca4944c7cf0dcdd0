"""Callbacks: heatmap arrays, parameter scalars, the S-score and the report, against hand values."""
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import DecathlonScore, LayerSelectionLogger, ResultsReport, TaskParamLogger, decathlon_score
from callbacks.params import task_param_metrics
from callbacks.report import collect_rows
from callbacks.selection import selection_matrix
from helpers import TinyTasks
from taps_lightning.module import TapsModule

TINY = dict(backbone="test_resnet", sparsity_warmup_epochs=0)


def _hand_scores(module, off):
    with torch.no_grad():
        for i, (name, layer) in enumerate(module.model.taps_layers()):
            for task in layer.tasks:
                layer.taps_score[task].fill_(0.05 if (task, i) in off else 0.3)


def test_selection_matrix_equals_hand_mask():
    module = TapsModule(tasks={"a": 3, "b": 4}, **TINY)
    n = len(module.model.gated_names)
    off = {("a", 0), ("a", 3), ("b", n - 1)}
    _hand_scores(module, off)
    tasks, layers, mask, scores = selection_matrix(module.model)
    expected = np.ones((2, n), dtype=np.float32)
    expected[0, 0] = expected[0, 3] = expected[1, n - 1] = 0
    assert tasks == ["a", "b"] and layers == module.model.layer_order()
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(scores, np.where(expected == 1, 0.3, 0.05), rtol=1e-6)


def test_decathlon_score_hand_computed():
    from callbacks.decathlon import BASELINE_ERRORS

    assert decathlon_score(dict(BASELINE_ERRORS)) == pytest.approx(2500.0)  # baseline everywhere: 250 per task
    assert decathlon_score({"svhn": 0.0}) == pytest.approx(1000.0)
    assert decathlon_score({"gtsrb": 0.2}) == 0.0  # worse than E_max = 2 x 2.47 %
    # aircraft error 0.30: E_max 0.7932, alpha 1000/0.7932^2
    assert decathlon_score({"aircraft": 0.30, "unknown": 0.1}) == pytest.approx(1000 / 0.7932**2 * (0.7932 - 0.30) ** 2)


def test_callbacks_reach_tensorboard_and_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    data = TinyTasks.make(tasks=("svhn", "b"), classes=(10, 3))
    module = TapsModule(tasks=data.num_classes, **TINY)
    logger = TensorBoardLogger(tmp_path, name="run")
    report = ResultsReport()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt"), LayerSelectionLogger(),
                                   TaskParamLogger(), DecathlonScore(), report])
    trainer.fit(module, data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"taps/layer_selection", "taps/scores"} <= set(events.Tags()["images"])
    assert len(events.Images("taps/layer_selection")) == 2  # one per epoch: the slider
    image = events.Images("taps/layer_selection")[-1]
    assert image.width > image.height > 0
    scalars = set(events.Tags()["scalars"])
    assert {"taps/svhn/active_layers", "taps/b/task_params_fraction", "taps/total_params_multiple",
            "val/svhn/acc", "val/decathlon_score"} <= scalars
    assert (tmp_path / "ckpt" / "layer_selection.png").is_file()
    # the logged values equal the model's own counts and the report rows
    metrics = task_param_metrics(module)
    last = events.Scalars("taps/svhn/active_layers")[-1].value
    assert last == metrics["taps/svhn/active_layers"] == module.task_cost("svhn")["active_layers"]
    acc = float(trainer.callback_metrics["val/svhn/acc"])
    assert events.Scalars("val/decathlon_score")[-1].value == pytest.approx(decathlon_score({"svhn": 1 - acc}), rel=1e-5)
    rows = {r["task"]: r for r in report.rows}
    assert rows["b"]["accuracy"] == pytest.approx(100 * float(trainer.callback_metrics["val/b/acc"]))
    assert rows["b"]["task_params"] == module.task_cost("b")["task_params"]
    text = (tmp_path / "run" / "version_0" / "report.md").read_text()
    assert "| svhn |" in text and "Total parameters for all tasks" in text


def test_report_is_written_after_validate_and_once_per_fit(tmp_path):
    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, **TINY)
    report = ResultsReport()
    stages = []
    write = report._write
    report._write = lambda trainer, pl_module, stage: (stages.append(stage), write(trainer, pl_module, stage))
    kw = dict(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[report], enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    L.Trainer(max_epochs=2, **kw).fit(module, data)
    assert stages == ["val"]  # at the end of fit, not after each validation epoch
    metrics = L.Trainer(**kw).validate(module, data, verbose=False)[0]
    assert stages == ["val", "val"]
    assert "(val set)" in (tmp_path / "report.md").read_text()
    assert report.rows[0]["accuracy"] == pytest.approx(100 * metrics["val/a/acc"])
