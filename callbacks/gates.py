"""``GateFlipLogger``: how often each task's gates change, as ``taps/<task>/gate_flips`` per epoch."""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from taps_lightning.training.lightning_module import TapsModule

__all__ = ["GateFlipLogger"]


class GateFlipLogger(L.Callback):
    """Counts each task's gate changes between optimizer steps during an epoch (on the device: no
    host sync per step) and logs the count at the epoch's end; gates that keep flipping late in a
    run are what ``--model.freeze_gates_epochs`` settles. Modes without gates log nothing."""

    def __init__(self) -> None:
        self.before: dict[str, Tensor] = {}
        self.flips: dict[str, Tensor] = {}
        self._pending = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        self._pending = pl_module.mode.learns_gates  # counted from the gates of the epoch's first step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: TapsModule, batch, batch_idx: int) -> None:
        if self._pending:  # after the module's own epoch start (the mode's phase is set)
            self._pending = False
            gates = {t: pl_module.model.gate_tensor(t) for t in pl_module.tasks}
            self.before = {t: g for t, g in gates.items() if g is not None}
            self.flips = {t: torch.zeros((), dtype=torch.long, device=g.device) for t, g in self.before.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TapsModule, outputs, batch, batch_idx: int) -> None:
        for task, before in self.before.items():
            now = pl_module.model.gate_tensor(task)
            self.flips[task] += (now != before).sum()
            self.before[task] = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: TapsModule) -> None:
        for task, flips in self.flips.items():  # the same on every rank (the scores are)
            pl_module.log(f"taps/{task}/gate_flips", flips.float(), on_step=False, on_epoch=True, batch_size=1,
                          sync_dist=True)
