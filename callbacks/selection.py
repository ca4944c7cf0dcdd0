"""TensorBoard figures of which layers each task adapts (the paper's Fig. 3-6)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from taps_lightning import MultiTaskModel, gate_open
from taps_lightning.training.lightning_module import TapsModule

__all__ = ["selection_mask", "draw_heatmap", "selection_images", "log_images", "save_images", "LayerSelectionLogger"]


def selection_mask(model: MultiTaskModel) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """``(layer names in forward order, mask [T, L], scores [T, L], threshold)`` from one call to
    :meth:`~taps_lightning.models.multitask.MultiTaskModel.layer_selection`; the mask is decided by the one
    gate rule the forward uses."""
    layers, scores, threshold = model.layer_selection()
    return layers, gate_open(scores, threshold).float().numpy(), scores.float().numpy(), threshold


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace("layer", "L").replace("downsample", "ds").replace("features.", "")


def draw_heatmap(values: np.ndarray, tasks: list[str], layers: list[str], title: str,
                 threshold: float | None = None) -> np.ndarray:
    """Render a tasks x layers heatmap to an RGB array ``[H, W, 3]`` (uint8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = min(40.0, max(6.0, 0.18 * len(layers) + 2))
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.45 * len(tasks)), dpi=80)
    if threshold is None:
        im = ax.imshow(values, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    else:
        span = max(float(np.abs(values - threshold).max()), 1e-3)
        im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=threshold - span, vmax=threshold + span,
                       interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, pad=0.01)
        cbar.ax.axhline(threshold, color="k", linewidth=2)
        cbar.set_label(f"score (tau={threshold:g})")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=90, fontsize=6)
    ax.set_title(title)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def selection_images(model: MultiTaskModel, when: str = "") -> dict[str, np.ndarray]:
    """``taps/layer_selection`` (active=1 / inactive=0) and ``taps/scores`` (raw scores, the
    threshold marked) as RGB arrays; ``when`` ends the titles (e.g. ``", epoch 3"``)."""
    tasks = model.tasks
    layers, mask, scores, threshold = selection_mask(model)
    return {
        "taps/layer_selection": draw_heatmap(mask, tasks, layers, f"task-specific layers{when}"),
        "taps/scores": draw_heatmap(scores, tasks, layers, f"layer scores{when}", threshold=threshold),
    }


def log_images(trainer: L.Trainer, images: dict[str, np.ndarray], step: int) -> None:
    """Add ``images`` to every logger that takes images (TensorBoard)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            for tag, image in images.items():
                experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def save_images(images: dict[str, np.ndarray], folder: Path) -> list[Path]:
    """Write each image as ``<folder>/<last part of its tag>.png`` (``layer_selection.png``, ``scores.png``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{tag.rsplit('/', 1)[-1]}.png" for tag in images]
    for path, image in zip(paths, images.values()):
        Image.fromarray(image).save(path)
    return paths


class LayerSelectionLogger(L.Callback):
    """After every validation epoch, log ``taps/layer_selection`` (active=1 / inactive=0) and
    ``taps/scores`` (raw scores, the threshold marked) as images to TensorBoard, so the
    step slider shows selection evolving; at the end of fit write both as PNG next to the
    checkpoints. Rank zero draws; it costs nothing per training step."""

    def _model(self, pl_module: TapsModule):
        model = pl_module.model
        return model if model.learns_gates and model.tasks else None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        model = self._model(pl_module)
        if model is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        log_images(trainer, selection_images(model, f", epoch {trainer.current_epoch}"), step=trainer.current_epoch)

    def on_fit_end(self, trainer, pl_module) -> None:
        model = self._model(pl_module)
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else None
        if model is None or folder is None or not trainer.is_global_zero:
            return
        save_images(selection_images(model), folder)
