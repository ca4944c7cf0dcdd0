"""LayerSelectionLogger and the heatmaps (callbacks/selection.py), and the callbacks together in a fit: arrays, images and TensorBoard against hand values."""
import io

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import DecathlonScore, LayerSelectionLogger, ResultsReport, TaskParamLogger, decathlon_score
from callbacks.params import task_param_metrics
from callbacks.selection import selection_mask
from helpers import TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module

from test_report import _table


TINY = dict(backbone="test_resnet", sparsity_warmup_epochs=0)


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the heatmaps are drawn on, kept open (``plt.close`` deferred) so a
    test can find where the plot area lies in the image and where each label was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        close(fig)


def read_heatmap(image: np.ndarray, fig, rows: int, cols: int) -> tuple[np.ndarray, list[str], list[str]]:
    """What a reader sees in a ``rows x cols`` heatmap image: the RGB colour at the centre of each
    cell of the plot area (``[rows, cols, 3]``), and the row and column labels in the order they
    stand next to the rows (top to bottom) and columns (left to right). ``fig`` gives the geometry
    (the plot area's box and the labels' places), ``image`` the pixels."""
    height = image.shape[0]
    ax = fig.axes[0]  # the heatmap; a colour bar, if any, comes after it
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    centres_x = box.x0 + (np.arange(cols) + 0.5) * box.width / cols
    centres_y = box.y1 - (np.arange(rows) + 0.5) * box.height / rows
    cells = np.stack([np.stack([image[int(height - y), int(x)] for x in centres_x]) for y in centres_y])

    def by_place(labels, along_y):
        placed = []
        for label in labels:
            if not label.get_text():
                continue
            extent = label.get_window_extent()
            placed.append(((extent.y0 + extent.y1) / 2 if along_y else (extent.x0 + extent.x1) / 2, label.get_text()))
        # top to bottom (display y falls) / left to right; each label beside its own row or column
        placed.sort(key=lambda p: -p[0] if along_y else p[0])
        centres = centres_y if along_y else centres_x
        for where, text in placed:
            nearest = int(np.argmin(np.abs(centres - where)))
            assert abs(centres[nearest] - where) < (box.height / rows if along_y else box.width / cols) / 2, text
        return [text for _, text in placed], [int(np.argmin(np.abs(centres - where))) for where, _ in placed]

    row_labels, row_of = by_place(ax.get_yticklabels(), True)
    col_labels, col_of = by_place(ax.get_xticklabels(), False)
    assert row_of == list(range(rows)) and col_of == list(range(cols))  # one label per row and column, in place
    return cells, row_labels, col_labels


def _dark(cells: np.ndarray) -> np.ndarray:
    """Black (task-specific) or white (shared) cells of the layer-selection map, nothing between."""
    grey = cells.astype(float).mean(-1)
    assert ((grey < 64) | (grey > 192)).all(), grey
    return grey < 64


def _short_names(layers):
    from callbacks.selection import _short

    return [_short(n) for n in layers]


def _hand_scores(module, off):
    with torch.no_grad():
        for i, (name, layer) in enumerate(module.model.taps_layers()):
            for task in layer.tasks:
                layer.taps_score[task].fill_(0.05 if (task, i) in off else 0.3)


def test_selection_mask_equals_hand_mask():
    module = create_taps_module(tasks={"a": 3, "b": 4}, **TINY)
    n = len(module.model.gated_names)
    off = {("a", 0), ("a", 3), ("b", n - 1)}
    _hand_scores(module, off)
    layers, mask, scores, threshold = selection_mask(module.model)
    expected = np.ones((2, n), dtype=np.float32)
    expected[0, 0] = expected[0, 3] = expected[1, n - 1] = 0
    assert layers == module.model.layer_order() and threshold == module.model.threshold
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(scores, np.where(expected == 1, 0.3, 0.05), rtol=1e-6)


def test_heatmaps_show_each_tasks_gates_in_its_row_under_its_name(drawn):
    """The images a user sees: one row per task, in the model's task order (not alphabetical),
    labelled with its name; one column per gated layer in forward order; a black cell exactly
    where the task's score reaches tau (``taps/layer_selection``) and a red one, blue below, in
    ``taps/scores``. Gates set by hand, so the expected picture is known without TAPS code."""
    from callbacks.selection import selection_images

    module = create_taps_module(tasks={"zeta": 3, "alpha": 4, "mid": 2}, **TINY)
    model = module.model
    model(torch.randn(2, 3, 32, 32), "zeta")  # forward order recorded
    layers = model.layer_order()
    n = len(layers)
    off = {("zeta", 0), ("zeta", 3), ("alpha", n - 1)} | {("mid", i) for i in range(n) if i != 1}
    with torch.no_grad():
        for i, name in enumerate(layers):
            for task in ("zeta", "alpha", "mid"):
                model.backbone.get_submodule(name).taps_score[task].fill_(0.05 if (task, i) in off else 0.3)
    expected = np.array([[(task, i) not in off for i in range(n)] for task in ("zeta", "alpha", "mid")])

    images = selection_images(model, ", epoch 7")
    assert len(drawn) == 2  # layer selection, then scores
    cells, rows, cols = read_heatmap(images["taps/layer_selection"], drawn[0], 3, n)
    assert rows == ["zeta", "alpha", "mid"] == model.tasks
    assert cols == _short_names(layers)
    np.testing.assert_array_equal(_dark(cells), expected)
    cells, rows, cols = read_heatmap(images["taps/scores"], drawn[1], 3, n)
    assert rows == ["zeta", "alpha", "mid"] and cols == _short_names(layers)
    red, blue = cells[..., 0].astype(int), cells[..., 2].astype(int)
    np.testing.assert_array_equal(red > blue + 30, expected)  # above tau: red
    np.testing.assert_array_equal(blue > red + 30, ~expected)  # below: blue


def _gates(model) -> np.ndarray:
    """``[tasks, layers in forward order]``: score >= tau, compared here in fp32 (the scores' dtype)."""
    tau = float(np.float32(model.threshold))
    return np.array([[model.backbone.get_submodule(name).taps_score[task].item() >= tau
                      for name in model.layer_order()] for task in model.tasks])


def test_callbacks_reach_tensorboard_and_report(tmp_path, drawn):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.selection import selection_images

    L.seed_everything(0)
    data = TinyTasks.make(tasks=("svhn", "b"), classes=(10, 3))
    module = create_taps_module(tasks=data.num_classes, **TINY)
    logger = TensorBoardLogger(tmp_path, name="run")
    report = ResultsReport()
    trainer = taps_trainer(accelerator="cpu", max_epochs=2, logger=logger, enable_progress_bar=False,
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
    # what the user sees: the last epoch's TensorBoard image and the PNG beside the checkpoints show
    # each task's gates in its named row (the same drawing as the hand-set test above; its geometry
    # taken from drawing the final state again, which the images must equal pixel for pixel)
    model, gates = module.model, _gates(module.model)
    tasks, layers = model.tasks, model.layer_order()
    assert tasks == ["svhn", "b"]
    shown = {"tensorboard": np.array(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")),
             "png": np.array(Image.open(tmp_path / "ckpt" / "layer_selection.png").convert("RGB"))}
    for where, when in (("tensorboard", ", epoch 1"), ("png", "")):
        drawn.clear()
        redrawn = selection_images(model, when)["taps/layer_selection"]
        np.testing.assert_array_equal(shown[where], redrawn, err_msg=where)
        cells, rows, cols = read_heatmap(shown[where], drawn[0], len(tasks), len(layers))
        assert rows == tasks and cols == _short_names(layers), where
        np.testing.assert_array_equal(_dark(cells), gates, err_msg=where)
    # the logged values equal the model's own counts and the report rows
    metrics = task_param_metrics(module)
    last = events.Scalars("taps/svhn/active_layers")[-1].value
    assert last == metrics["taps/svhn/active_layers"] == module.task_cost("svhn")["active_layers"]
    acc = float(trainer.callback_metrics["val/svhn/acc"])
    assert events.Scalars("val/decathlon_score")[-1].value == pytest.approx(decathlon_score({"svhn": 1 - acc}), rel=1e-5)
    rows = {r["task"]: r for r in report.rows}
    accs = {t: 100 * float(trainer.callback_metrics[f"val/{t}/acc"]) for t in ("svhn", "b")}
    assert rows["b"]["accuracy"] == pytest.approx(accs["b"])
    assert rows["b"]["task_params"] == module.task_cost("b")["task_params"]
    mean = (accs["svhn"] + accs["b"]) / 2
    assert rows["total / mean"]["accuracy"] == pytest.approx(mean) == 100 * float(trainer.callback_metrics["val/acc"])
    text = (tmp_path / "run" / "version_0" / "report.md").read_text()
    assert "Total parameters for all tasks" in text
    assert _table(text) == pytest.approx({"svhn": round(accs["svhn"], 2), "b": round(accs["b"], 2),
                                          "total / mean": round(mean, 2)}, abs=1e-9)
